"""Prometheus metrics of the server, in vLLM's names with a `glm45:` prefix, so dashboards port over.

Two kinds of numbers. The engine's own state and counters (running/waiting requests, KV-cache usage,
prefix-cache queries and hits, tokens in and out, preemptions, MTP acceptance) are read at scrape time
from the snapshot of `LLMEngine.stats()` that the engine thread leaves after every step, so a scrape
never touches the engine. Latencies (time to first token, time per output token, end-to-end) are
observed by the engine thread as outputs come out of `step()`, into histograms.

Each server has its own `CollectorRegistry` (no global state), so several servers can live in one
process, as they do in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "glm45:"

# Buckets as in vLLM: tiny models on CPU sit at the low end, large models on GPUs at the high end.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0,
               120.0, 300.0)


class EngineStatsCollector(Collector):
    """Exposes the latest `LLMEngine.stats()` snapshot (a dict) as gauges and counters."""

    def __init__(self, snapshot: Callable[[], dict], model_name: str,
                 kv_cache_resident: Callable[[], int | None] | None = None):
        self._snapshot = snapshot
        self._kv_cache_resident = kv_cache_resident
        self._labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(PREFIX + name, doc, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), value)
        return family

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        yield self._gauge("num_requests_running", "Sequences in the running batch.", stats["num_running"])
        yield self._gauge("num_requests_waiting", "Sequences waiting to be scheduled.", stats["num_waiting"])
        yield self._gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
                          stats["kv_cache_usage"])
        yield self._gauge("num_kv_cache_blocks", "KV-cache blocks in total.", stats["num_blocks"])
        yield self._gauge("weight_bytes", "Bytes of the model's weights on this process (packed when quantized).",
                          stats.get("weight_bytes", 0))
        yield self._gauge("kv_cache_bytes", "Bytes of the KV cache on this process.", stats.get("kv_cache_bytes", 0))
        resident = self._kv_cache_resident() if self._kv_cache_resident else None
        if resident is not None:  # a host cache's pages become resident as requests first write them
            yield self._gauge("kv_cache_resident_bytes", "Bytes of the host KV cache resident in memory.", resident)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            stats["prefix_cache_queries"])
        yield self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                            stats["prefix_cache_hits"])
        yield self._counter("num_preemptions", "Sequences preempted to free KV-cache blocks.",
                            stats["num_preemptions"])
        yield self._counter("prompt_tokens", "Prompt tokens received.", stats["prompt_tokens"])
        yield self._counter("generation_tokens", "Tokens generated.", stats["generation_tokens"])
        rates = stats.get("spec_acceptance_rates") or []
        family = GaugeMetricFamily(PREFIX + "spec_decode_acceptance_rate",
                                   "MTP draft acceptance rate per draft position.",
                                   labels=[*self._labels, "position"])
        for position, rate in enumerate(rates):
            family.add_metric([*self._labels.values(), str(position)], rate)
        yield family
        yield self._gauge("spec_decode_mean_accepted_length",
                          "Mean tokens emitted per speculative step (1 + accepted drafts); 0 when MTP is off.",
                          stats.get("spec_mean_accepted_length") or 0.0)


class ServerMetrics:
    """The registry of one server: engine stats plus the latency histograms and request counters."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict],
                 kv_cache_resident: Callable[[], int | None] | None = None):
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(snapshot, model_name, kv_cache_resident))
        labels = ["model_name"]
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from arrival to the first generated token.",
            labels, buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.time_per_output_token = Histogram(
            PREFIX + "time_per_output_token_seconds", "Time between generated tokens of one sequence.",
            labels, buckets=TPOT_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token of a request.",
            labels, buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self._request_success = Counter(
            PREFIX + "request_success", "Requests finished, by finish reason.",
            [*labels, "finished_reason"], registry=self.registry)
        self._model_name = model_name

    def request_finished(self, reason: str) -> None:
        self._request_success.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
