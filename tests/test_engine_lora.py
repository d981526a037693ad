"""LoRA adapters served per request: one batch mixes requests of several adapters and of the base model, and each
request gets exactly the tokens of an engine running its adapter merged into the weights; the same prompt under two
adapters never shares prefix-cache blocks; adapters the engine cannot serve are refused clearly."""

import json

import pytest
import torch
from tiny_checkpoints import save_reference

from glm45 import LLM, LoRARequest, SamplingParams
from glm45.model import Glm4MoeForCausalLM
from glm45.train.lora import apply_lora, merge_lora
from glm45.train.lora_io import load_adapter, save_adapter

ADAPTERS = {"attn": (("q_proj", "v_proj"), 4), "mlp": (("o_proj", "gate_proj", "down_proj"), 2),
            "all": (("q_proj", "k_proj", "v_proj", "o_proj"), 8)}
PROMPTS = [[5, 17, 42, 7, 99, 3], [11, 12, 13], [5, 17, 42, 7, 99, 3], [200, 100, 50, 25, 12, 6, 3, 1], [7] * 20,
           [5, 17, 42, 7, 99, 3], [88, 77, 66]]
WHICH = [None, "attn", "mlp", "all", "attn", "all", "mlp"]  # prompt 0 under the base, 2 and 5 under adapters
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_serving")
    base = save_reference("air_like", root / "base")
    adapters, merged = {}, {}
    for i, (name, (targets, rank)) in enumerate(ADAPTERS.items()):
        model = Glm4MoeForCausalLM.from_pretrained(base, dtype=torch.float32, progress=False)
        apply_lora(model, rank=rank, alpha=2.0 * rank, targets=targets)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        adapters[name] = save_adapter(model, root / name, rank, 2.0 * rank, targets)
        reference = Glm4MoeForCausalLM.from_pretrained(base, dtype=torch.float32, progress=False)
        load_adapter(reference, adapters[name])
        merge_lora(reference).save_pretrained(root / f"merged-{name}")
        merged[name] = root / f"merged-{name}"
    return base, adapters, merged


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_a_mixed_batch_gives_each_request_its_merged_adapters_tokens(served):
    base, adapters, merged = served
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=3, max_num_seqs=16)
    requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    mixed = tokens(llm.generate(prompts, GREEDY, use_tqdm=False,
                                lora_request=[requests[w] if w else None for w in WHICH]))
    assert len(llm.engine.list_loras()) == 3

    expected = {None: tokens(LLM(str(base), dtype="float32").generate(prompts, GREEDY, use_tqdm=False))}
    for name, path in merged.items():
        expected[name] = tokens(LLM(str(path), dtype="float32").generate(prompts, GREEDY, use_tqdm=False))
    for i, which in enumerate(WHICH):
        assert mixed[i] == expected[which][i], (i, which)
    assert len({tuple(mixed[i]) for i in (0, 2, 5)}) == 3  # one prompt, three models, three answers
    # The base-only requests afterwards still run (captured step or eager) with the base's tokens.
    assert tokens(llm.generate(prompts[:2], GREEDY, use_tqdm=False)) == expected[None][:2]


def test_adapters_the_engine_cannot_hold_or_serve_are_refused(served, tmp_path):
    base, adapters, _ = served
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=4)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False,
                 lora_request=LoRARequest("attn", 1, str(adapters["attn"])))
    with pytest.raises(ValueError, match="max-loras"):
        llm.engine.add_lora(LoRARequest("mlp", 2, str(adapters["mlp"])))
    with pytest.raises(ValueError, match="max-lora-rank"):
        LLM(str(base), dtype="float32", enable_lora=True, max_lora_rank=4).engine.add_lora(
            LoRARequest("all", 3, str(adapters["all"])))
    model = Glm4MoeForCausalLM.from_pretrained(base, dtype=torch.float32, progress=False)
    apply_lora(model, rank=2, alpha=4.0, targets=("q_proj", "experts"))
    experts = save_adapter(model, tmp_path / "experts", 2, 4.0, ("q_proj", "experts"))
    with pytest.raises(ValueError, match="glm45 merge"):
        LLM(str(base), dtype="float32", enable_lora=True).engine.add_lora(LoRARequest("experts", 4, str(experts)))
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(str(base), dtype="float32").generate([{"prompt_token_ids": [1, 2]}], GREEDY, use_tqdm=False,
                                                 lora_request=LoRARequest("attn", 1, str(adapters["attn"])))


def test_the_server_serves_adapters_by_model_name_in_shared_batches(tmp_path):
    import concurrent.futures

    from openai import OpenAI
    from server_helpers import ServerThread, save_random_model

    from glm45.server.config import lora_requests

    base = save_random_model(tmp_path / "base")
    paths = {}
    for i, name in enumerate(("sql", "poet")):
        model = Glm4MoeForCausalLM.from_pretrained(base, dtype=torch.float32, progress=False)
        apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
        paths[name] = save_adapter(model, tmp_path / name, 4, 8.0, ("q_proj", "v_proj", "o_proj"))
    prompt = "[gMASK]<sop><|user|>\nHello<|assistant|>"
    expected = {None: LLM(str(base), dtype="float32").generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].text}
    for name, path in paths.items():
        merged = Glm4MoeForCausalLM.from_pretrained(base, dtype=torch.float32, progress=False)
        load_adapter(merged, path)
        merge_lora(merged).save_pretrained(tmp_path / f"merged-{name}")
        (tmp_path / f"merged-{name}" / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
        outputs = LLM(str(tmp_path / f"merged-{name}"), dtype="float32").generate(prompt, GREEDY, use_tqdm=False)
        expected[name] = outputs[0].outputs[0].text

    modules = [f"sql={paths['sql']}", json.dumps({"name": "poet", "path": str(paths["poet"])})]
    with ServerThread(base, enable_lora=True) as server:
        for lora in lora_requests(modules):
            server.engine.add_lora(lora)
        client = OpenAI(base_url=server.base_url, api_key="none")
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {"tiny", "sql", "poet"} and cards["sql"].parent == "tiny"

        def complete(model):
            reply = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0.0,
                                              extra_body={"ignore_eos": True})
            return reply.choices[0].text

        models = ["tiny", "sql", "poet", "sql", "tiny", "poet"]
        with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
            texts = list(pool.map(complete, models))
    for model, text in zip(models, texts, strict=True):
        assert text == expected[None if model == "tiny" else model], model
    assert len({expected[k] for k in expected}) == 3


def test_lora_modules_flags_turn_on_lora_and_name_the_adapters(served):
    from glm45.cli import build_parser
    from glm45.server.config import configs_from_args, lora_requests

    base, adapters, _ = served
    args = ["serve", str(base), "--lora-modules", f"attn={adapters['attn']}", f"mlp={adapters['mlp']}"]
    engine_config, server_config = configs_from_args(build_parser().parse_args(args))
    assert engine_config.enable_lora and engine_config.max_loras >= 2
    assert [r.lora_name for r in lora_requests(server_config.lora_modules)] == ["attn", "mlp"]
    with pytest.raises(ValueError, match="name=path"):
        lora_requests(["no-equals-sign"])
    with pytest.raises(ValueError, match="distinct"):
        lora_requests([f"a={adapters['attn']}", f"a={adapters['mlp']}"])


def test_the_captured_cpu_step_serves_adapter_rows_as_the_eager_path_does(served):
    """The captured decode step (CPU programs with per-row LoRA ops) against `enforce_eager` on the same mixed batch:
    the same tokens and log-probabilities, and no step small enough to be captured falls back to the eager forward.
    The adapters arrive one at a time, each adapting layers the earlier ones did not, so the programs are rebuilt."""
    from glm45.engine.captured_cpu import CapturedDecode

    base, adapters, _ = served
    requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    which = [requests[w] if w else None for w in WHICH]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    results = {}
    for eager in (False, True):
        llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=3, max_num_seqs=16, enforce_eager=eager)
        runner = llm.engine.runner
        assert isinstance(runner.captured, CapturedDecode) != eager
        fallbacks = []

        def eager_forward(inputs, rows, plain=runner._eager_forward, fallbacks=fallbacks):
            if inputs.adapter_ids:
                fallbacks.append(len(inputs.token_ids))
            return plain(inputs, rows)

        runner._eager_forward = eager_forward
        for name in ADAPTERS:  # one adapter at a time first: each wraps new layers
            llm.generate(prompts[:1], params, use_tqdm=False, lora_request=requests[name])
        results[eager] = llm.generate(prompts, params, use_tqdm=False, lora_request=which)
        if not eager:
            assert all(rows > 64 for rows in fallbacks), fallbacks
    for fast, slow in zip(results[False], results[True], strict=True):
        assert fast.outputs[0].token_ids == slow.outputs[0].token_ids
        for a, b in zip(fast.outputs[0].logprobs, slow.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
