"""Loading hostile or damaged files: safetensors headers, indexes and config.json that would read the wrong bytes,
crash with a traceback or allocate without end are refused with a `ValueError` naming the problem, a model that
cannot fit in memory is refused with the numbers before anything is allocated, and the CLI says it in one line."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from tiny_checkpoints import save_reference

from glm45.cli import main
from glm45.config import ModelConfig
from glm45.model import Glm4MoeForCausalLM, memory
from glm45.model.checkpoint import Checkpoint, CheckpointError, SafetensorsFile


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return save_reference("air_like", tmp_path_factory.mktemp("air_like"))


def write_safetensors(path, header, data: bytes = b"\0" * 64):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


BAD_HEADERS = {
    "a list": [1, 2],
    "negative offsets": {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
    "offsets past the end": {"w": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}},
    "size not dtype × shape": {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
    "overlapping": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
    "a negative dimension": {"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}},
    "a float dimension": {"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}},
    "an unknown dtype": {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
    "an entry that is a list": {"w": [1, 2, 3]},
    "one offset": {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4]}},
}


@pytest.mark.parametrize("kind", list(BAD_HEADERS))
def test_bad_safetensors_headers_are_refused(tmp_path, kind):
    path = write_safetensors(tmp_path / "model.safetensors", BAD_HEADERS[kind])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        SafetensorsFile(path)


def test_a_good_header_reads_the_right_bytes(tmp_path):
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}, "e": {"dtype": "F32", "shape": [0],
                                                                                   "data_offsets": [16, 16]}}
    file = SafetensorsFile(write_safetensors(tmp_path / "model.safetensors", header, data))
    assert file.get("b").tolist() == [4.0, 5.0, 6.0, 7.0] and file.get("e").numel() == 0


@pytest.mark.parametrize("index", [[1], {"weight_map": ["model.safetensors"]},
                                   {"weight_map": {"w": "../elsewhere.safetensors"}}, {"weight_map": {"w": 5}}])
def test_bad_indexes_are_refused(good_folder, tmp_path, index):
    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        Checkpoint(folder)


@pytest.mark.parametrize(("change", "words"), [
    (lambda c: [c], "must be a JSON object"),
    (lambda c: {**c, "num_hidden_layers": 10**6}, "'num_hidden_layers' is 1000000, more than glm45 accepts"),
    (lambda c: {**c, "hidden_size": 1e6}, "'hidden_size' must be a positive integer"),
    (lambda c: {**c, "rope_parameters": [1, 2]}, "invalid config.json"),
    (lambda c: {**c, "rope_scaling": "x"}, "invalid config.json"),
])
def test_bad_config_json_is_refused(good_folder, tmp_path, change, words):
    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_pretrained(folder)


def test_a_model_that_cannot_fit_is_refused_with_the_numbers(good_folder, monkeypatch, capsys):
    model = Glm4MoeForCausalLM.from_pretrained(good_folder, dtype="float32", progress=False)
    loaded = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with torch.device("meta"):
        meta = Glm4MoeForCausalLM(model.config, with_mtp=False)
    assert memory.model_bytes(meta, torch.float32) == loaded
    monkeypatch.setattr(memory, "available_bytes", lambda device: loaded - 1)
    with pytest.raises(memory.ModelTooLarge, match=r"needs 0\.\d+ GiB for its weights in float32 on cpu, but only"):
        Glm4MoeForCausalLM.from_pretrained(good_folder, dtype="float32", progress=False)
    assert main(["info", str(good_folder), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glm45: error:") and "needs" in err and len(err.strip().splitlines()) == 1


def test_the_cli_reports_hostile_files_in_one_line(good_folder, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    (folder / "config.json").write_text("[1, 2, 3]")
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "must be a JSON object" in err and len(err.strip().splitlines()) == 1
    shutil.copy(good_folder / "config.json", folder / "config.json")
    write_safetensors(folder / "model.safetensors", [])
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "header must be a JSON object" in err and len(err.strip().splitlines()) == 1
