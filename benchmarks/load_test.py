"""A load test of `glm45 serve`: N clients for T seconds mixing streamed and non-streamed chat and text
completions, clients that disconnect mid-stream, bad inputs, and 10 MB prompts, against a server this script
starts itself on 127.0.0.1 (the bundled model by default) and stops at the end.

    python benchmarks/load_test.py                               # 16 clients, 600 s, the bundled model
    python benchmarks/load_test.py --clients 8 --duration 60     # a quick look
    python benchmarks/load_test.py --num-speculative-tokens 1    # with MTP

It prints, per kind of request, the count, p50/p99 latency and the outcomes; errors by kind (any 5xx, a stream
without `[DONE]` or with an error event, a status other than the expected, a timeout: a lost or stuck
request); `/health` latency (p50/p99, overall and while a 10 MB prompt is in flight) measured from a separate
process; the server's resident memory after warm-up and at the end, and its growth apart from the host KV cache's
pages (which become resident as requests first write them, read from /metrics); and whether the engine was
idle at the end (no running or waiting request, KV-cache usage 0). A second, short phase sends only 10 MB
prompts, one after another, and measures `/health` while they are refused, without the mixed load competing
for the CPU. It exits 1 if any target is missed: an error, a busy engine at the end, /health p99 ≥ 100 ms while
10 MB prompts are refused (second phase), or memory growth ≥ 5% besides the KV cache. The load generator shares
the CPU with the server (and whatever else runs): read the timings as indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict

import httpx

CHAT_KINDS = ("chat_stream", "chat", "completion", "completion_stream", "disconnect", "bad")
USER = [{"role": "user", "content": "What is 12*7? Answer briefly."}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def health_prober(url: str, stop_at: float, interval: float, out) -> None:
    """In its own process: GET /health every `interval` s; sends [(start wall time, latency s, status)]."""
    import http.client

    results = []
    host, port = url.removeprefix("http://").split(":")
    while time.time() < stop_at:
        start = time.time()
        try:
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            connection.request("GET", "/health")
            status = connection.getresponse().status
            connection.close()
        except OSError:
            status = 0
        results.append((start, time.time() - start, status))
        time.sleep(max(0.0, interval - (time.time() - start)))
    out.send(results)


BAD_BODIES = [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/chat/completions", b'{"model": "\\udfff", "messages": []}'),
    ("/v1/chat/completions", json.dumps({"messages": USER, "seed": 2**64}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": USER, "stop": ["x"] * 100_000}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": USER, "max_completion_tokens": 0}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": 5}}}], "tool_choice": {"type": "function", "function": {"name": "f"}}})
     .encode()),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
                             b'"function": {"name": "f", "parameters": {"a": ' + b"[" * 955 + b"]" * 955 + b"}}}]}"),
    ("/v1/completions", json.dumps({"prompt": ["hi"] * 1000, "n": 128}).encode()),
    ("/v1/completions", b'{"prompt": "unterminated'),
    ("/tokenize", json.dumps({"messages": USER, "chat_template_kwargs": {"enable_thinking": "no"}}).encode()),
]


class Load:
    def __init__(self, url: str, seed: int, max_tokens: int):
        self.url = url
        self.rng = random.Random(seed)
        self.max_tokens = max_tokens
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.errors: Counter = Counter()
        self.huge_windows: list[tuple[float, float]] = []

    def record(self, kind: str, started: float, outcome: str, ok: bool) -> None:
        self.latencies[kind].append(time.monotonic() - started)
        self.outcomes[kind][outcome] += 1
        if not ok:
            self.errors[f"{kind}: {outcome}"] += 1

    async def sse(self, client: httpx.AsyncClient, path: str, body: dict, read_all: bool) -> str:
        async with client.stream("POST", self.url + path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return f"status {response.status_code}"
            events = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if not read_all and len(events) >= 3:
                        return "disconnected"
            if not events or events[-1] != "[DONE]":
                return "stream without [DONE]"
            if len(events) > 1 and events[-2].startswith('{"error"'):
                return "error event"
            return "ok"

    async def one(self, client: httpx.AsyncClient) -> None:
        kind = self.rng.choice(CHAT_KINDS)
        max_tokens = self.rng.randint(4, self.max_tokens)
        chat = {"messages": USER, "max_tokens": max_tokens, "temperature": 0.8, "n": self.rng.choice((1, 1, 2))}
        if self.rng.random() < 0.3:
            chat["tools"] = [TOOL]
        text = {"prompt": ["Once upon a time", "The capital of France is"][: self.rng.randint(1, 2)],
                "max_tokens": max_tokens, "n": self.rng.choice((1, 2))}
        started = time.monotonic()
        try:
            if kind == "chat_stream":
                outcome = await self.sse(client, "/v1/chat/completions", {**chat, "stream": True}, True)
            elif kind == "completion_stream":
                outcome = await self.sse(client, "/v1/completions", {**text, "stream": True}, True)
            elif kind == "disconnect":
                outcome = await self.sse(client, "/v1/chat/completions", {**chat, "max_tokens": 200, "stream": True},
                                         False)
                outcome = "ok" if outcome in ("disconnected", "ok") else outcome
            elif kind == "bad":
                path, body = self.rng.choice(BAD_BODIES)
                response = await client.post(self.url + path, content=body,
                                             headers={"Content-Type": "application/json"})
                outcome = "ok" if 400 <= response.status_code < 500 else f"status {response.status_code}"
            else:
                path, body = ("/v1/chat/completions", chat) if kind == "chat" else ("/v1/completions", text)
                response = await client.post(self.url + path, json=body)
                outcome = "ok" if response.status_code == 200 else f"status {response.status_code}"
        except httpx.TimeoutException:
            outcome = "timeout (lost or stuck)"
        except httpx.HTTPError as e:
            outcome = f"connection error {type(e).__name__}"
        self.record(kind, started, outcome, outcome == "ok")

    async def client_loop(self, stop_at: float, timeout: float) -> None:
        async with httpx.AsyncClient(timeout=timeout) as client:
            while time.time() < stop_at:
                await self.one(client)

    async def huge_prompts(self, stop_at: float, megabytes: int, interval: float) -> None:
        body = json.dumps({"prompt": "a" * (megabytes * 2**20), "max_tokens": 4}).encode()
        async with httpx.AsyncClient(timeout=60) as client:
            while time.time() < stop_at:
                started, wall = time.monotonic(), time.time()
                try:
                    response = await client.post(self.url + "/v1/completions", content=body,
                                                 headers={"Content-Type": "application/json"})
                    outcome = "ok" if response.status_code in (400, 413) else f"status {response.status_code}"
                except httpx.HTTPError as e:
                    outcome = f"connection error {type(e).__name__}"
                self.huge_windows.append((wall, time.time()))
                self.record(f"{megabytes}MB prompt", started, outcome, outcome == "ok")
                await asyncio.sleep(interval)


def metric_values(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """The server's `glm45:` gauges `names` that /metrics has."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(f"glm45:{name}{{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values


def engine_state(url: str) -> dict[str, float]:
    return metric_values(url, ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"))


def kv_cache_resident(url: str) -> int:
    """The server's host KV-cache pages that are resident (0 where it has no such gauge, e.g. a GPU)."""
    return int(metric_values(url, ("kv_cache_resident_bytes",)).get("kv_cache_resident_bytes", 0))


def wait_idle(url: str, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        state = engine_state(url)
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "glm45.cli", "--log-level", "WARNING", "serve", *([args.model] if args.model else
               []), "--port", str(port), "--uvicorn-log-level", "warning", "--max-num-seqs", str(args.max_num_seqs),
               "--num-speculative-tokens", str(args.num_speculative_tokens)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "w"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"glm45 serve exited with {server.returncode}; see {args.server_log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("glm45 serve did not become healthy")


async def run_load(load: Load, args, stop_at: float) -> None:
    tasks = [load.client_loop(stop_at, args.request_timeout) for _ in range(args.clients)]
    tasks.append(load.huge_prompts(stop_at, args.huge_prompt_mb, args.huge_interval))
    await asyncio.gather(*tasks)


def health_during(load: Load, health: list) -> list[float]:
    """Latencies of the /health probes that overlapped a 10 MB prompt in flight."""
    return [latency for start, latency, _ in health
            if any(a <= start <= b or a <= start + latency <= b for a, b in load.huge_windows)]


def refusal_phase(url: str, args) -> tuple[Load, list]:
    """Only 10 MB prompts, back to back, with /health probed from another process."""
    load = Load(url, args.seed + 1, args.max_tokens)
    stop_at = time.time() + args.refusal_duration
    receiver, sender = multiprocessing.Pipe(duplex=False)
    prober = multiprocessing.Process(target=health_prober, args=(url, stop_at, 0.02, sender), daemon=True)
    prober.start()
    asyncio.run(load.huge_prompts(stop_at, args.huge_prompt_mb, 0.0))
    health = receiver.recv()
    prober.join(10)
    return load, health


def report(load: Load, health: list, rss: dict, idle: dict, refusals: tuple[Load, list], args) -> bool:
    print(f"\n{'kind':<20}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}  outcomes")
    for kind in sorted(load.latencies):
        values = load.latencies[kind]
        outcomes = ", ".join(f"{k} {v}" for k, v in load.outcomes[kind].most_common())
        print(f"{kind:<20}{len(values):>8}{percentile(values, 0.5) * 1e3:>10.1f}{percentile(values, 0.99) * 1e3:>10.1f}"
              f"  {outcomes}")
    total = sum(len(v) for v in load.latencies.values())
    print(f"\nrequests: {total} in {args.duration:.0f} s with {args.clients} clients; errors: "
          + (", ".join(f"{k} × {v}" for k, v in load.errors.most_common()) or "none"))
    during = health_during(load, health)
    all_latencies = [latency for _, latency, _ in health]
    bad_health = sum(1 for *_, status in health if status != 200)
    print(f"/health: {len(health)} probes, p50 {percentile(all_latencies, 0.5) * 1e3:.1f} ms, "
          f"p99 {percentile(all_latencies, 0.99) * 1e3:.1f} ms; while a {args.huge_prompt_mb} MB prompt was in "
          f"flight: {len(during)} probes, p50 {percentile(during, 0.5) * 1e3:.1f} ms, "
          f"p99 {percentile(during, 0.99) * 1e3:.1f} ms; not 200: {bad_health}")
    growth = (rss["end"] - rss["warm"]) / rss["warm"]
    # The host KV cache's pages become resident as requests first write them (up to the whole cache), which is not
    # a leak: the target is on the rest of the process.
    rest_warm, rest_end = rss["warm"] - rss["warm_kv"], rss["end"] - rss["end_kv"]
    rest_growth = (rest_end - rest_warm) / rest_warm
    print(f"server memory (RSS): {rss['start'] / 2**20:.0f} MiB at start, {rss['warm'] / 2**20:.0f} MiB after warm-up, "
          f"{rss['max'] / 2**20:.0f} MiB at most, {rss['end'] / 2**20:.0f} MiB at the end: growth {growth:+.2%}; "
          f"of it the KV cache's resident pages {rss['warm_kv'] / 2**20:.0f} → {rss['end_kv'] / 2**20:.0f} MiB, the "
          f"rest {rest_warm / 2**20:.0f} → {rest_end / 2**20:.0f} MiB: growth {rest_growth:+.2%}")
    refused, refusal_health = refusals
    alone = health_during(refused, refusal_health)
    sizes = refused.latencies.get(f"{args.huge_prompt_mb}MB prompt", [])
    print(f"refusal phase ({args.refusal_duration:.0f} s of {args.huge_prompt_mb} MB prompts only): "
          f"{len(sizes)} refused, p50 {percentile(sizes, 0.5) * 1e3:.1f} ms each, "
          f"errors: {dict(refused.errors) or 'none'}; /health while one was in flight: {len(alone)} probes, "
          f"p50 {percentile(alone, 0.5) * 1e3:.1f} ms, "
          f"p99 {percentile(alone, 0.99) * 1e3:.1f} ms, max {max(alone, default=float('nan')) * 1e3:.1f} ms")
    print(f"engine at the end: {idle}")
    met = {
        "no errors (no 5xx, no lost or stuck request)": not load.errors and not refused.errors and bad_health == 0,
        "engine idle at the end": not any(idle.values()),
        "/health p99 < 100 ms while 10 MB prompts are refused": bool(alone) and percentile(alone, 0.99) < 0.1,
        "memory growth < 5% (besides the KV cache's pages)": rest_growth < 0.05,
    }
    for target, ok in met.items():
        print(f"  [{'x' if ok else ' '}] {target}")
    return all(met.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the memory baseline "
                        "(default: 10%% of the duration)")
    parser.add_argument("--max-tokens", type=int, default=48, help="largest max_tokens a request asks for")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=0, help="MTP drafts per step for the server")
    parser.add_argument("--huge-prompt-mb", type=int, default=10)
    parser.add_argument("--huge-interval", type=float, default=0.5, help="seconds between 10 MB prompts")
    parser.add_argument("--refusal-duration", type=float, default=30.0, help="seconds of the 10 MB-only phase")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="a request slower than this is stuck")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-log", default="load_test_server.log")
    args = parser.parse_args()
    warmup = args.duration * 0.1 if args.warmup is None else args.warmup

    server, url = start_server(args)
    try:
        rss = {"start": rss_bytes(server.pid)}
        load = Load(url, args.seed, args.max_tokens)
        started = time.time()
        stop_at = started + args.duration
        receiver, sender = multiprocessing.Pipe(duplex=False)
        prober = multiprocessing.Process(target=health_prober, args=(url, stop_at, 0.05, sender), daemon=True)
        prober.start()

        async def main_loop():
            load_task = asyncio.ensure_future(run_load(load, args, stop_at))
            await asyncio.sleep(warmup)
            rss["warm"], rss["warm_kv"] = rss_bytes(server.pid), kv_cache_resident(url)
            rss["max"] = rss["warm"]
            while not load_task.done():
                rss["max"] = max(rss["max"], rss_bytes(server.pid))
                await asyncio.wait({load_task}, timeout=1.0)
            await load_task

        asyncio.run(main_loop())
        health = receiver.recv()
        prober.join(10)
        refusals = refusal_phase(url, args)
        idle = wait_idle(url)
        rss["end"], rss["end_kv"] = rss_bytes(server.pid), kv_cache_resident(url)
        ok = report(load, health, rss, idle, refusals, args)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"server exit status: {server.returncode} (log: {os.path.abspath(args.server_log)})")
    return 0 if ok and server.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
