"""The web chat at `/`: the page and its files as served, the MTP counts it shows, and the page itself driven in
a real headless Chromium through Playwright — a chat with thinking on and off, the API key, a server error, a
tool-call round trip, and HTML in model output and tool results that must be shown, never run.

The browser tests use a real `glm45 serve` process with the scripted model (its answer is known token for
token, see server_helpers.py) and, when it exists, the bundled trained model. They need Debian's `chromium`
at /usr/bin/chromium and the `playwright` package (`.ci/run` installs both) and skip without them; Playwright
never downloads a browser here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from server_helpers import (
    SCRIPT_ANSWER,
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

from glm45.engine.engine import bundled_model_path
from glm45.server.config import ServerConfig

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
API_KEY = "sesame"
TIMEOUT_MS = 20_000
# HTML that runs `pwn()` if a page ever parses it. Its tokens are all distinct, so the scripted model can say it.
MODEL_INJECTION = "<IMG/SRC onerror=pwn()>"
TOOL_INJECTION = '{"temp": 21, "note": "<img src=x onerror=pwn()><script>pwn()</script>"}'


# ---------------------------------------------------------------------------------------------------
# Servers and the browser


class ServeProcess:
    """`glm45 serve ARGS` on a free loopback port, as a real process."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "GLM45_API_KEY"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "glm45.cli", "serve", *args, "--port", str(self.port), "--device", "cpu",
             "--uvicorn-log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**env, "OMP_NUM_THREADS": "1"})

    def __enter__(self) -> ServeProcess:
        try:
            wait_healthy(self.url, self.process)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory):
    folder = save_scripted_model(tmp_path_factory.mktemp("scripted_model"))
    with ServeProcess(str(folder), "--dtype", "float32", "--max-model-len", "1024", "--num-gpu-blocks-override",
                      "128", "--served-model-name", "scripted", "--api-key", API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (in .ci/run) could not install it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                   "(`pip install playwright` in .ci/run)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class ChatPage:
    """One fresh browser page on the chat, recording the chat requests it sends and any page errors."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests = []
        self.errors = []
        self.page.on("request", self._on_request)
        self.response_types = []
        self.page.on("response", lambda r: self.response_types.append(r.headers.get("content-type", ""))
                     if r.url.endswith("/v1/chat/completions") else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url + "/")
        # A function the injected HTML calls; it records that it ran.
        self.page.evaluate("() => { window.pwned = false; window.pwn = () => { window.pwned = true; }; }")

    def _on_request(self, request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            self.requests.append((request.headers, request.post_data_json))

    def enter_key(self, key: str = API_KEY) -> None:
        self.page.locator("#api-key").wait_for(state="visible")
        self.page.fill("#api-key", key)

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def answers(self):
        return self.page.locator(".msg.assistant")

    def wait_for_answers(self, count: int, timeout_ms: float = TIMEOUT_MS):
        """The `count`-th answer, once it has finished (its statistics line appears at the end)."""
        answer = self.answers().nth(count - 1)
        answer.locator(".stats").wait_for(state="visible", timeout=timeout_ms)
        return answer

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def chat(browser, scripted_server):
    page = ChatPage(browser, scripted_server.url)
    yield page
    page.close()
    assert page.errors == [], page.errors


# ---------------------------------------------------------------------------------------------------
# Without a browser


def test_the_page_is_served_without_a_key_and_the_api_is_not(tmp_path):
    folder = save_random_model(tmp_path / "model")
    with ServerThread(folder, ServerConfig(api_key="k")) as server:
        with urllib.request.urlopen(server.url + "/") as response:
            page = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/html")
            policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert '<script src="/static/app.js"' in page and "/static/style.css" in page
        for name, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
            with urllib.request.urlopen(f"{server.url}/static/{name}") as response:
                assert kind in response.headers["Content-Type"] and response.read()
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(server.url + "/v1/models")
        assert error.value.code == 401


def test_usage_counts_the_mtp_drafts_of_each_answer(tmp_path):
    """The page's "MTP acceptance" comes from usage.completion_tokens_details; for a request that runs alone
    the counts equal what the engine's own acceptance statistics recorded for it."""
    folder = save_random_model(tmp_path / "mtp", with_mtp=True)
    request = dict(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=40, temperature=0,
                   extra_body={"ignore_eos": True})
    with ServerThread(folder, num_speculative_tokens=2) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        counted = server.engine.executor.stats
        before = sum(counted.proposed), sum(counted.accepted)
        chunks = list(client.chat.completions.create(**request, stream=True,
                                                     stream_options={"include_usage": True}))
        details = chunks[-1].usage.completion_tokens_details
        proposed, accepted = sum(counted.proposed) - before[0], sum(counted.accepted) - before[1]
        assert proposed > 0
        assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == \
            (accepted, proposed - accepted)
        again = client.chat.completions.create(**request).usage.completion_tokens_details
        assert again == details  # greedy: the same drafts, counted per request
    with ServerThread(folder) as server:  # MTP off: no draft counts at all
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        assert client.chat.completions.create(**request).usage.completion_tokens_details is None


# ---------------------------------------------------------------------------------------------------
# In the browser, with the scripted model


def test_chat_with_key_thinking_on_and_off_and_a_server_error(chat):
    page = chat.page
    chat.send("Hello")
    error = page.locator(".msg.error").first
    error.wait_for()
    assert "401" in error.inner_text() and "API key" in error.inner_text()

    chat.enter_key()
    page.click("#regenerate")
    answer = chat.wait_for_answers(1)
    assert page.locator(".msg.error").count() == 0
    headers, body = chat.requests[-1]
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert body["stream"] is True and body["chat_template_kwargs"] == {"enable_thinking": True}
    assert chat.response_types[-1].startswith("text/event-stream")  # the answer came as a stream
    assert body["messages"] == [{"role": "user", "content": "Hello"}]
    assert answer.locator(".thinking summary").inner_text() == "Thought"
    assert answer.locator(".thinking-text").text_content() == SCRIPT_REASONING
    # No tools were given, so the call stays text: shown literally, never as markup.
    assert answer.locator(".content").inner_text() == SCRIPT_ANSWER
    stats = answer.locator(".stats").inner_text()
    assert "tokens" in stats and "tok/s" in stats and "MTP off" in stats

    page.uncheck("#thinking")
    chat.send("Again, without thinking")
    answer = chat.wait_for_answers(2)
    _, body = chat.requests[-1]
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == SCRIPT_ANSWER
    assert answer.locator(".thinking").count() == 0
    assert answer.locator(".content").inner_text() == SCRIPT_ANSWER

    page.fill("#max-tokens", "5000")  # more than the 1024-token context
    chat.send("Too long")
    error = page.locator(".msg.error")  # the 401 note went with the regenerated turn
    error.wait_for()
    assert "maximum context length is 1024 tokens" in error.inner_text()
    assert not page.is_disabled("#regenerate") and not page.is_disabled("#send")


def test_tool_call_round_trip_and_screenshot(chat, tmp_path):
    page = chat.page
    chat.enter_key()
    page.click("#example-tool")
    assert json.loads(page.input_value("#tools")) == [WEATHER_TOOL]
    chat.send("What is the weather in Beijing?")
    answer = chat.wait_for_answers(1)
    assert answer.locator(".content").inner_text() == SCRIPT_CONTENT
    card = answer.locator(".tool-call")
    assert card.count() == 1
    assert card.locator(".tool-name").inner_text() == "get_weather"
    assert json.loads(card.locator(".tool-args").inner_text()) == {"city": SCRIPT_CITY}
    assert chat.requests[-1][1]["tools"] == [WEATHER_TOOL]

    card.locator(".tool-result").fill(TOOL_INJECTION)
    page.click("text=Send tool results")
    chat.wait_for_answers(2)
    messages = chat.requests[-1][1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    call = messages[1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps({"city": SCRIPT_CITY},
                                                                                ensure_ascii=False)}
    assert messages[2] == {"role": "tool", "tool_call_id": call["id"], "content": TOOL_INJECTION}
    # The tool result is on the page as text; its HTML made no elements and ran nothing.
    assert page.locator(".msg.tool pre").inner_text() == TOOL_INJECTION
    assert page.locator("#conversation img, #conversation script").count() == 0
    assert page.evaluate("window.pwned") is False

    shot = tmp_path / "webchat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_markdown_is_built_from_text_nodes(chat):
    html = chat.page.evaluate("""renderMarkdown(
        '# Title\\n\\nSome **bold**, *em*, `a<b>` and [a link](https://example.com) and [bad](javascript:pwn()).\\n'
        + '- one\\n- two <b>x</b>\\n\\n```python\\nif a < b:\\n    print("<script>")\\n```\\n> quoted'
    ).innerHTML""")
    assert html == (
        '<h1>Title</h1>'
        '<p>Some <strong>bold</strong>, <em>em</em>, <code>a&lt;b&gt;</code> and '
        '<a href="https://example.com/" target="_blank" rel="noopener noreferrer">a link</a> and '
        '[bad](javascript:pwn()).</p>'
        '<ul><li>one</li><li>two &lt;b&gt;x&lt;/b&gt;</li></ul>'
        '<div class="code"><div class="code-head">python<button class="copy" type="button">Copy</button></div>'
        '<pre><code>if a &lt; b:\n    print("&lt;script&gt;")</code></pre></div>'
        '<blockquote><p>quoted</p></blockquote>')


def test_html_in_model_output_is_shown_not_run(browser, tmp_path):
    pieces = ["<|assistant|>", "<think>", "</think>", MODEL_INJECTION]
    folder = save_scripted_model(tmp_path / "model", pieces)
    with ServerThread(folder) as server:
        chat = ChatPage(browser, server.url)
        chat.send("Say something dangerous")
        answer = chat.wait_for_answers(1)
        assert answer.locator(".content").inner_text() == MODEL_INJECTION
        assert chat.page.locator("#conversation img").count() == 0
        assert chat.page.evaluate("window.pwned") is False
        chat.close()
    assert chat.errors == []


def test_stop_keeps_the_partial_answer_and_regenerate_replaces_it(browser, tmp_path):
    folder = save_random_model(tmp_path / "model")  # gibberish, and plenty of it
    # The eager decode path keeps 900 tokens slower than a click; the captured one can finish them first.
    with ServerThread(folder, enforce_eager=True) as server:
        chat = ChatPage(browser, server.url)
        chat.page.fill("#max-tokens", "900")
        chat.send("Talk for a long time")
        for _ in range(3):  # a random model may sample an end token before the click lands: then try again
            answer = chat.answers().first
            answer.locator(".content p").wait_for()  # streaming has started
            chat.page.click("#stop", force=True)  # a no-op if the answer has ended meanwhile
            answer.locator(".stats").wait_for()
            if "stopped" in answer.locator(".stats").inner_text():
                break
            sent, deadline = len(chat.requests), time.monotonic() + 10
            chat.page.click("#regenerate")
            while len(chat.requests) == sent and time.monotonic() < deadline:  # its request has gone out
                chat.page.wait_for_timeout(20)
        assert "stopped" in answer.locator(".stats").inner_text() and answer.locator(".content").inner_text()
        deadline = time.monotonic() + 10
        while server.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.engine.has_unfinished_requests()  # the stopped request was aborted on the server

        chat.page.fill("#max-tokens", "5")
        chat.page.click("#regenerate")
        answer = chat.wait_for_answers(1)
        assert chat.answers().count() == 1  # replaced, not added
        assert [m["role"] for m in chat.requests[-1][1]["messages"]] == ["user"]
        assert int(answer.locator(".stats").inner_text().split(" tokens")[0]) <= 5
        chat.close()
    assert chat.errors == []


# ---------------------------------------------------------------------------------------------------
# In the browser, with the bundled trained model


def test_bundled_model_in_the_browser(browser, tmp_path):
    """The tool-call round trip of examples/tool_call_roundtrip.py, played by hand in the page."""
    try:
        folder = bundled_model_path()
    except FileNotFoundError:
        pytest.skip("the bundled trained model (glm45/assets/*/config.json) is not there yet")
    config = json.loads((folder / "config.json").read_text())
    mtp = ["--num-speculative-tokens", "1"] if config.get("num_nextn_predict_layers") else []
    with ServeProcess(*mtp) as server:  # `glm45 serve` with no model: the bundled one
        chat = ChatPage(browser, server.url)
        chat.page.fill("#temperature", "0")
        chat.page.fill("#max-tokens", "512")
        chat.page.click("#example-tool")
        chat.send("What's the weather like in Beijing right now?")
        answer = chat.wait_for_answers(1, timeout_ms=180_000)
        assert answer.locator(".tool-call .tool-name").first.inner_text() == "get_weather"
        assert "city" in json.loads(answer.locator(".tool-args").first.inner_text())
        stats = answer.locator(".stats").inner_text()
        assert "tok/s" in stats and ("MTP acceptance" in stats if mtp else "MTP off" in stats)

        chat.page.uncheck("#thinking")
        answer.locator(".tool-result").first.fill('{"city": "Beijing", "temperature_c": 21, "sky": "clear"}')
        chat.page.click("text=Send tool results")
        answer = chat.wait_for_answers(2, timeout_ms=180_000)
        _, body = chat.requests[-1]
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "tool"]
        assert answer.locator(".thinking").count() == 0 and answer.locator(".content").inner_text().strip()
        shot = tmp_path / "webchat_bundled.png"
        chat.page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        chat.close()
    assert chat.errors == []
