import json
from pathlib import Path

import pytest

from glm45.config import ModelConfig

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "glm-4.5"


def released(name: str) -> dict:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"reference file {path} not present")
    return json.loads(path.read_text())


def test_released_glm45_config_legacy_layout():
    config = ModelConfig.from_dict(released("config.json"))
    assert config.hidden_size == 5120 and config.num_hidden_layers == 92
    assert config.rope_theta == 1_000_000 and config.partial_rotary_factor == 0.5
    assert config.rotary_dim == 64 and config.use_qk_norm and config.routed_scaling_factor == 2.5
    assert config.eos_token_id == [151329, 151336, 151338]
    assert config.num_nextn_predict_layers == 1


def test_released_air_config():
    config = ModelConfig.from_dict(released("config-air.json"))
    assert config.first_k_dense_replace == 1 and not config.use_qk_norm and config.n_routed_experts == 128


def test_transformers5_layout_reads_rope_parameters():
    raw = released("config.json")
    del raw["rope_theta"], raw["partial_rotary_factor"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.25}
    config = ModelConfig.from_dict(raw)
    assert config.rope_theta == 5e5 and config.partial_rotary_factor == 0.25 and config.rotary_dim == 32


def test_written_config_round_trips():
    config = ModelConfig.from_dict(released("config-air.json"))
    assert ModelConfig.from_dict(config.to_hf_dict()) == config


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"num_key_value_heads": 7}, "num_key_value_heads"),
        ({"num_experts_per_tok": 200}, "num_experts_per_tok"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 2}, "topk_group"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ],
)
def test_invalid_configs_name_the_field(change, field):
    raw = {**released("config.json"), **change}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(raw)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
