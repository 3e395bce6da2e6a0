"""Prometheus metrics: requests, latency, errors by family and class, tokens; and the engine's
statistics under vLLM's names (``vllm:*``: the vLLM engine's own stat logger, or the transformers
backend's scheduler, see :mod:`hfserve.backends.stats`), served together on ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# no ``*_created`` series (one per counter and histogram child: noise to every scraper)
disable_created_metrics()


class Metrics:
    """One registry per app, so several apps (tests) can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        #: the engine's registry, served after hfserve's own (set by the app; None: none yet)
        self.engine_registry: Callable[[], Any] = lambda: None
        self.requests = Counter(
            "hfserve_requests_total",
            "Requests answered, by API family (openai, v1, v2, grpc, other) and status (HTTP code, or gRPC status name).",
            ["family", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hfserve_request_duration_seconds",
            "Time from request start to the end of the response, by API family.",
            ["family"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.errors = Counter(
            "hfserve_errors_total",
            "Error responses (and in-stream errors), by API family and error class code.",
            ["family", "code"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "hfserve_requests_in_flight", "Requests being served by a route now, by API family.", ["family"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "hfserve_prompt_tokens_total", "Prompt tokens processed.", registry=self.registry
        )
        self.generation_tokens = Counter(
            "hfserve_generation_tokens_total", "Tokens generated.", registry=self.registry
        )
        self.disconnects = Counter(
            "hfserve_client_disconnects_total",
            "Requests whose client went away before the answer was complete.",
            ["family"],
            registry=self.registry,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set (``labels`` validates and
        takes a lock on every call; the request path needs four per request)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> tuple[bytes, str]:
        body = generate_latest(self.registry)
        engine = self.engine_registry()
        if engine is not None:
            body += generate_latest(engine)
        return body, CONTENT_TYPE_LATEST
