"""`glm45 serve` and `glm45 chat` as commands: flags, SIGTERM draining a real server process, the terminal chat,
the example script, and the tool-call round trip with the bundled trained model when it is there."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from server_helpers import (
    SCRIPT_CITY,
    SCRIPT_CONTENT,
    SCRIPT_REASONING,
    WEATHER_TOOL,
    ServerThread,
    free_port,
    save_random_model,
    save_scripted_model,
    wait_healthy,
)

from glm45.cli import build_parser, main
from glm45.config import EngineConfig
from glm45.engine.engine import LLMEngine, bundled_model_path
from glm45.server.config import configs_from_args
from glm45.terminal_chat import ChatSettings, TerminalChat

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scripted_model(tmp_path_factory):
    return save_scripted_model(tmp_path_factory.mktemp("scripted_model"))


def _bundled() -> Path | None:
    try:
        return bundled_model_path()
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# Flags


def serve_configs(*argv: str):
    return configs_from_args(build_parser().parse_args(["serve", *argv]))


def test_serve_flags_use_vllm_names():
    engine, server = serve_configs(
        "/models/glm", "--max-model-len", "4096", "--max-num-seqs", "8", "--dtype", "bfloat16",
        "--served-model-name", "glm-4.5-air", "alias", "--tool-call-parser", "glm45", "--reasoning-parser", "glm45",
        "--enable-auto-tool-choice", "--api-key", "k", "--host", "0.0.0.0", "--port", "9000",
        "--no-enable-prefix-caching", "--default-chat-template-kwargs", '{"enable_thinking": false}',
        "--tensor-parallel-size", "1")
    assert (engine.model, engine.max_model_len, engine.max_num_seqs, engine.dtype) == ("/models/glm", 4096, 8,
                                                                                       "bfloat16")
    assert engine.enable_prefix_caching is False and engine.num_speculative_tokens == 0
    assert server.served_model_name == ["glm-4.5-air", "alias"] and server.api_key == "k"
    assert (server.host, server.port, server.enable_auto_tool_choice) == ("0.0.0.0", 9000, True)
    assert server.default_chat_template_kwargs == {"enable_thinking": False}
    # every spelling of MTP speculative decoding
    assert serve_configs("--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}')[0] \
        .num_speculative_tokens == 2
    assert serve_configs("--speculative-num-steps", "3")[0].num_speculative_tokens == 3
    assert serve_configs("--num-speculative-tokens", "1")[0].num_speculative_tokens == 1
    sglang = ("--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
              "--speculative-num-draft-tokens", "4")
    assert serve_configs(*sglang)[0].num_speculative_tokens == 3
    assert serve_configs("--speculative-algorithm", "NEXTN")[0].num_speculative_tokens == 1
    with pytest.raises(ValueError, match="topk"):
        serve_configs("--speculative-eagle-topk", "4")
    assert serve_configs("--model", "/m")[0].model == "/m" and serve_configs()[0].model is None
    with pytest.raises(ValueError, match="ngram"):
        serve_configs("--speculative-config", '{"method": "ngram"}')
    if any(f.name == "tensor_parallel_size" for f in dataclasses.fields(EngineConfig)):
        assert serve_configs("--tensor-parallel-size", "2")[0].tensor_parallel_size == 2
    else:
        with pytest.raises(ValueError, match="tensor-parallel-size"):
            serve_configs("--tensor-parallel-size", "2")
    with pytest.raises(SystemExit):
        serve_configs("--default-chat-template-kwargs", "not json")


def test_serve_without_a_model_fails_clearly_until_one_is_bundled(capsys):
    if _bundled() is not None:
        pytest.skip("a bundled model exists, so `glm45 serve` with no model would serve it")
    assert main(["serve", "--port", str(free_port())]) == 2
    error = capsys.readouterr().err
    assert "no bundled model" in error and "pass a model folder" in error


# ---------------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_drains_in_flight_streams(tmp_path):
    folder = save_random_model(tmp_path / "model")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "glm45.cli", "serve", str(folder), "--port", str(port), "--dtype", "float32",
         "--device", "cpu", "--max-model-len", "1024", "--num-gpu-blocks-override", "128",
         "--served-model-name", "tiny", "--uvicorn-log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=300, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        process.send_signal(signal.SIGTERM)
        chunks.extend(stream)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finish == ["length"] and chunks[-1].usage.completion_tokens == 300
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    assert "Traceback" not in stderr, stderr


def test_health_reports_a_dead_tensor_parallel_worker(tmp_path):
    """With --tensor-parallel-size 2 the engine runs a worker process; once it dies /health says 503, so an
    orchestrator restarts the server, and requests fail with an error instead of hanging."""
    folder = save_random_model(tmp_path / "model")
    with ServerThread(folder, tensor_parallel_size=2, max_model_len=256, num_gpu_blocks_override=64) as server:
        try:
            c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
            before = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0)
            assert before.usage.completion_tokens >= 1
            with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
                assert response.status == 200
            worker = server.engine.workers.processes[0]
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(server.url + "/health", timeout=10)
            assert error.value.code == 503 and "worker" in json.loads(error.value.read())["error"]["message"]
            with pytest.raises(openai.APIStatusError) as failed:
                c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert failed.value.status_code in (500, 503)
        finally:
            server.engine.shutdown()


# ---------------------------------------------------------------------------------------------------
# glm45 chat


def _reader(lines: list[str]):
    pending = list(lines)
    prompts = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read, prompts


def test_terminal_chat_thinking_tools_and_reset(scripted_model):
    engine = LLMEngine(EngineConfig(model=str(scripted_model), dtype="float32", device="cpu", max_model_len=1024,
                                    num_gpu_blocks_override=256))
    out = io.StringIO()
    chat = TerminalChat(engine, ChatSettings(temperature=0, max_tokens=40, color=False), tools=[WEATHER_TOOL],
                        out=out)
    read, prompts = _reader(["What is the weather?", "sunny, 21 C"])
    chat.run(read)
    text = out.getvalue()
    assert SCRIPT_REASONING in text and SCRIPT_CONTENT in text
    assert f'→ tool call: get_weather({json.dumps({"city": SCRIPT_CITY}, ensure_ascii=False)})' in text
    assert prompts[:2] == ["> ", "result of get_weather> "]
    roles = [m["role"] for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert chat.messages[1]["reasoning_content"] == SCRIPT_REASONING and chat.messages[2]["content"] == "sunny, 21 C"

    # thinking hidden: recorded, not printed; /reset forgets the conversation
    out = io.StringIO()
    chat = TerminalChat(engine, ChatSettings(temperature=0, max_tokens=40, color=False, hide_thinking=True),
                        out=out)
    read, _ = _reader(["hi", "/reset", "/exit"])
    chat.run(read)
    assert SCRIPT_REASONING not in out.getvalue() and "(conversation reset)" in out.getvalue()
    assert chat.messages == []

    # no thinking: the prompt closes the thought, the answer is all content (no tools: the call is text)
    out = io.StringIO()
    chat = TerminalChat(engine, ChatSettings(temperature=0, max_tokens=40, color=False, thinking=False), out=out)
    chat.run(_reader(["hi"])[0])
    assert chat.messages[-1]["content"].startswith(SCRIPT_CONTENT + "<tool_call>get_weather")
    assert "reasoning_content" not in chat.messages[-1]


def test_chat_command(scripted_model):
    """`glm45 chat` wires its flags (the engine's, generated, and the chat's) to the terminal chat."""
    result = subprocess.run(
        [sys.executable, "-m", "glm45.cli", "--log-level", "WARNING", "chat", str(scripted_model), "--no-color",
         "--temperature", "0", "--max-tokens", "40", "--device", "cpu", "--dtype", "float32",
         "--max-model-len", "1024", "--num-gpu-blocks-override", "64", "--hide-thinking"],
        input="hello\n/reset\n/exit\n", capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert SCRIPT_CONTENT + "<tool_call>get_weather" in result.stdout
    assert SCRIPT_REASONING not in result.stdout and "(conversation reset)" in result.stdout


# ---------------------------------------------------------------------------------------------------
# The example script


def _load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_call_roundtrip", ROOT / "examples" / "tool_call_roundtrip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_both_steps(scripted_model, capsys):
    """The scripted model always calls get_weather, so this checks the script's protocol, not an answer."""
    example = _load_example()
    with ServerThread(scripted_model, max_model_len=2048) as server:
        result = example.run(server.base_url)
    assert result["calls"] == [("get_weather", {"city": SCRIPT_CITY})]
    assert "tool call: get_weather" in capsys.readouterr().out
    assert result["finish_reason"] in ("tool_calls", "stop")


def test_bundled_model_tool_call_round_trip():
    folder = _bundled()
    if folder is None:
        pytest.skip("the bundled trained model (glm45/assets/*/config.json) is not there yet")
    example = _load_example()
    with ServerThread(folder, dtype="auto", max_model_len=None, num_gpu_blocks_override=512) as server:
        result = example.run(server.base_url, verbose=False)
        assert result["calls"] and result["calls"][0][0] == "get_weather"
        assert "city" in result["calls"][0][1]
        assert result["final"].content and result["finish_reason"] == "stop"

