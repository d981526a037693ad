"""lm-evaluation-harness against a real glm45 server on loopback, serving the bundled model.

lm-eval's own `local-completions` client runs two log-likelihood tasks (a rolling perplexity task and a multiple-
choice task) and its `local-chat-completions` client a generation task, all defined from files written here (no
hub). The scores are checked against glm45's offline computation: `glm45 eval` for the perplexity texts, the
engine's prompt log-probabilities for the choices, and `LLM.chat` for the generations. Skipped without lm-eval
(`pip install -e ".[eval]"`).
"""

from __future__ import annotations

import json
import math
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local JSONL files; nothing is downloaded
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
pytest.importorskip("tenacity", reason="lm-eval's API clients are not installed (pip install -e '.[eval]')")

from server_helpers import ServerThread  # noqa: E402

from glm45 import LLM, SamplingParams  # noqa: E402
from glm45.cli import main  # noqa: E402
from glm45.config import bundled_model_path  # noqa: E402
from glm45.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
    "The weather in Paris is sunny with a temperature of 21°C.",
    "I can convert units, do arithmetic and look up the weather for you.",
    "blue kettle",
    "Hello! How can I help you today?",
]
CHOICES = [
    {"context": "The capital of France is", "choices": ["Paris.", "Rome.", "a kettle."], "answer": 0},
    {"context": "The weather in Oslo is", "choices": ["sunny.", "Hello!", "3 km"], "answer": 0},
    {"context": "Repeat after me: blue kettle\nblue", "choices": ["kettle", "Paris", "miles"], "answer": 0},
    {"context": "12 * 7 =", "choices": ["84", "19", "seven"], "answer": 0},
]
QUESTIONS = [
    {"question": "Repeat after me: blue kettle", "answer": "blue kettle"},
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris."},
    {"question": "Say hello.", "answer": "Hello!"},
    {"question": "Repeat after me: Oslo", "answer": "Oslo"},
]
GENERATION = {"until": ["\n\n"], "max_gen_toks": 48, "do_sample": False, "temperature": 0}
TOLERANCE = 1e-4


def task_files(folder) -> None:
    """Three tasks over local JSONL files, in lm-eval's YAML format."""
    def write(name: str, rows: list[dict], body: dict) -> None:
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        config = {"task": name, "dataset_path": "json", "test_split": "test",
                  "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}}, **body}
        (folder / f"{name}.yaml").write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML

    write("glm45_tiny_perplexity", [{"text": t} for t in TEXTS], {
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}]})
    write("glm45_tiny_choice", CHOICES, {
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "choices",
        "doc_to_target": "answer", "metric_list": [{"metric": "acc"}]})
    write("glm45_tiny_chat", QUESTIONS, {
        "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": GENERATION, "metric_list": [{"metric": "exact_match"}]})


@pytest.fixture(scope="module")
def lm_eval_results(tmp_path_factory):
    """lm-eval's results for the three tasks, run against one server."""
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    task_files(folder)
    tasks = TaskManager(include_path=str(folder), include_defaults=False)
    model = str(bundled_model_path())
    prefix_id = Tokenizer.from_pretrained(model).special_token_id("[gMASK]")
    with ServerThread(bundled_model_path()) as server:
        completions = lm_eval.simple_evaluate(
            model="local-completions", tasks=["glm45_tiny_perplexity", "glm45_tiny_choice"], task_manager=tasks,
            model_args={"model": "tiny", "base_url": f"{server.base_url}/completions", "tokenizer": model,
                        "tokenizer_backend": "huggingface", "custom_prefix_token_id": prefix_id,
                        "max_length": 1024, "batch_size": 3, "num_concurrent": 1, "max_retries": 1},
            log_samples=True)
        chat = lm_eval.simple_evaluate(
            model="local-chat-completions", tasks=["glm45_tiny_chat"], task_manager=tasks, apply_chat_template=True,
            model_args={"model": "tiny", "base_url": f"{server.base_url}/chat/completions", "num_concurrent": 1,
                        "max_retries": 1}, log_samples=True)
    return completions, chat


def sample_scores(results: dict, task: str) -> list:
    """Per document, in document order: lm-eval's responses."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_rolling_loglikelihoods_equal_glm45_eval(lm_eval_results, tmp_path, capsys):
    completions, _ = lm_eval_results
    data, report_file = tmp_path / "texts.jsonl", tmp_path / "report.json"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    # lm-eval scores every token of a text after its prefix token; `--text-prefix` is the same context.
    assert main(["eval", "--data", str(data), "--output", str(report_file), "--text-prefix", "[gMASK]",
                 "--dtype", "float32", "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    offline = [record["logprob"] for record in json.loads(report_file.read_text())["per_record"]]
    served = [resps[0][0] for resps in sample_scores(completions, "glm45_tiny_perplexity")]
    assert len(served) == len(offline) == len(TEXTS)
    assert max(abs(a - b) for a, b in zip(served, offline, strict=True)) <= TOLERANCE
    byte_perplexity = math.exp(-sum(offline) / sum(len(t.encode()) for t in TEXTS))
    metrics = completions["results"]["glm45_tiny_perplexity"]
    assert metrics["byte_perplexity,none"] == pytest.approx(byte_perplexity, rel=1e-5)


def test_multiple_choice_loglikelihoods_equal_the_engine_offline(lm_eval_results):
    completions, _ = lm_eval_results
    llm = LLM(dtype="float32", device="cpu")
    prompts, params = [], []
    for doc in CHOICES:
        context_ids = llm.tokenizer.encode(doc["context"])
        for choice in doc["choices"]:  # lm-eval's split: the whole encoded, the context's ids first
            whole = llm.tokenizer.encode(doc["context"] + " " + choice)
            assert whole[:len(context_ids)] == context_ids
            prompts.append({"prompt_token_ids": whole})
            params.append(SamplingParams(prompt_logprobs=0, prompt_logprobs_from=len(context_ids), max_tokens=1))
    outputs = iter(llm.generate(prompts, params, use_tqdm=False))
    correct = 0
    for doc, resps in zip(CHOICES, sample_scores(completions, "glm45_tiny_choice"), strict=True):
        offline = []
        for _ in doc["choices"]:
            output = next(outputs)
            ids, entries = output.prompt_token_ids, output.prompt_logprobs
            offline.append(sum(entries[p][ids[p]] for p in range(len(ids)) if entries[p] is not None))
        served = [r[0][0] for r in resps]
        assert max(abs(a - b) for a, b in zip(served, offline, strict=True)) <= TOLERANCE
        correct += max(range(len(offline)), key=offline.__getitem__) == doc["answer"]
    assert completions["results"]["glm45_tiny_choice"]["acc,none"] == pytest.approx(correct / len(CHOICES))


def test_chat_generations_equal_llm_chat(lm_eval_results):
    _, chat = lm_eval_results
    llm = LLM(dtype="float32", device="cpu")
    params = SamplingParams(temperature=0, max_tokens=GENERATION["max_gen_toks"], stop=GENERATION["until"])
    answers = llm.chat([[{"role": "user", "content": q["question"]}] for q in QUESTIONS], params, use_tqdm=False)
    served = [resps[0][0] for resps in sample_scores(chat, "glm45_tiny_chat")]
    assert served == [a.content for a in answers]
    matches = sum(a.content == q["answer"] for a, q in zip(answers, QUESTIONS, strict=True))
    assert 0 < matches < len(QUESTIONS)  # a score that can tell a change
    assert chat["results"]["glm45_tiny_chat"]["exact_match,none"] == pytest.approx(matches / len(QUESTIONS))
