"""The transformers backend's engine statistics, under vLLM's metric names.

Inference gateways (the Gateway API Inference Extension's endpoint picker) and autoscalers
(KEDA, Knative) read vLLM's metrics; the transformers backend exports the same names, labels
(``model_name``: the served name; ``engine``: ``"0"``) and histogram buckets, computed by its
generation scheduler (:mod:`.scheduler`) with the same meaning:

- ``vllm:num_requests_running``: sequences decoding now (rows of the running batch, and the
  requests being prefilled); ``--max-num-seqs`` caps it, as on vLLM.
- ``vllm:num_requests_waiting``: sequences handed to the scheduler and not decoding yet (they
  wait for a free row, or for the batch window).
- ``vllm:kv_cache_usage_perc``: a fraction (0-1, as vLLM's): the KV-cache positions held by the
  running rows (each row's cache length, left padding included: that memory is allocated)
  against the most the backend allows itself, ``max_num_seqs * max_model_len`` positions.
- ``vllm:lora_requests_info`` (with ``--enable-lora``): the adapters of the running and the
  waiting requests (comma-separated names) and ``max_lora`` (``--max-loras``); the value is the
  time of the scrape, as vLLM's.
- the histograms ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
  ``vllm:e2e_request_latency_seconds``, ``vllm:request_queue_time_seconds`` and the counters
  ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ``vllm:request_success_total``
  (``finished_reason``: stop, length, error; ``abort`` stays 0: as vLLM 0.32, a request
  aborted by its client or its deadline is not counted) — a request with ``n`` sequences
  finishes once per sequence.

Times run from the request's arrival at the scheduler. The gauges are computed at each scrape
from a snapshot of the scheduler's state, so nothing stays "running" after the rows are freed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# vLLM 0.32's bucket boundaries (vllm/v1/metrics/buckets.py), copied so that the backend needs no vLLM
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")


@dataclass
class Snapshot:
    """What the scheduler holds now (read at a scrape)."""

    running: int = 0
    waiting: int = 0
    kv_positions: int = 0
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)


class _Gauges(Collector):
    def __init__(self, stats: EngineStats):
        self.stats = stats

    def collect(self) -> Iterable[Any]:
        stats = self.stats
        snap = stats.snapshot() if stats.snapshot is not None else Snapshot()
        labels = ["model_name", "engine"]
        values = [stats.model_name, "0"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.", labels=labels)
        running.add_metric(values, snap.running)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels=labels)
        waiting.add_metric(values, snap.waiting)
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage (positions held against max_num_seqs * max_model_len).",
            labels=labels,
        )
        usage.add_metric(values, min(1.0, snap.kv_positions / stats.kv_capacity) if stats.kv_capacity else 0.0)
        yield from (running, waiting, usage)
        if stats.max_lora is not None:
            info = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            )
            info.add_metric(
                [str(stats.max_lora), ",".join(dict.fromkeys(snap.waiting_adapters)), ",".join(dict.fromkeys(snap.running_adapters))],
                time.time(),
            )
            yield info


class EngineStats:
    """The scheduler's statistics in a registry of their own (the server serves it on ``/metrics``).

    ``snapshot`` (set by the scheduler) gives the gauges' values; the decode thread records the
    rest with :meth:`admitted`, :meth:`tokens` and :meth:`finished`.
    """

    def __init__(self, model_name: str, *, max_num_seqs: int, max_model_len: int, max_lora: int | None = None):
        self.model_name = model_name
        self.kv_capacity = max(0, int(max_num_seqs) * int(max_model_len))
        self.max_lora = max_lora
        self.snapshot: Callable[[], Snapshot] | None = None
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        values = (model_name, "0")
        reg = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(*values)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TIME_TO_FIRST_TOKEN_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=reg).labels(*values)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=reg).labels(
            *values
        )
        success = Counter("vllm:request_success", "Count of successfully processed requests.", [*labels, "finished_reason"], registry=reg)
        self.success = {reason: success.labels(*values, reason) for reason in FINISHED_REASONS}
        reg.register(_Gauges(self))

    # decode thread ---------------------------------------------------------
    def admitted(self, arrived: float, prompt_tokens: int, now: float) -> None:
        self.queue.observe(max(0.0, now - arrived))
        self.prompt_tokens.inc(prompt_tokens)

    def tokens(self, count: int, arrived: float, first: float | None, last: float | None, now: float) -> None:
        """``count`` tokens sampled for one request at ``now`` (``first``/``last``: earlier tokens' times)."""
        self.generation_tokens.inc(count)
        if first is None:
            self.ttft.observe(max(0.0, now - arrived))
        elif last is not None:
            self.itl.observe(max(0.0, now - last))

    def finished(self, arrived: float, reasons: list[str], rows: int, error: bool, now: float) -> None:
        """One request ended: a success per finished sequence, its e2e latency. As on vLLM 0.32, a
        request aborted (client gone, timeout) adds neither; one that failed counts ``error``."""
        for reason in reasons:
            self.success[reason if reason in self.success else "stop"].inc()
        missing = rows - len(reasons)
        if missing > 0 and error:
            self.success["error"].inc(missing)
        if error or missing <= 0:
            self.e2e.observe(max(0.0, now - arrived))
