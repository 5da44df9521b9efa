"""Prometheus metrics of one server: engine state, request latencies, tokens and HTTP statuses.

Each app owns its own `CollectorRegistry`, so several apps (tests, replicas in one process) never
share counters. Engine state (running/waiting requests, KV usage, cache hits) is read from the
service's `stats()` (all engine cores together) and `core_stats()` (one sample per core, label
`core` = "0".."N-1") when `/metrics` is scraped, with `glmv_engine_up` (1 while the engine runs);
latencies and token counts are recorded as each request progresses (`glmv.server.runs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from glmv.tasks.types import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets in seconds: from a fast GPU decode step up to minutes-long CPU generations.
_TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
# Label values come from closed sets only, so that no client can add series: a method outside
# this set is counted as "other", a path no route matches as "unmatched".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineSource:
    """Where the collector reads the engine's state: all cores, each core, and whether it runs."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        core_stats: Callable[[], list[EngineStats]] | None = None,
        running: Callable[[], bool] | None = None,
    ) -> None:
        self.stats = stats
        self.core_stats = core_stats if core_stats is not None else (lambda: [stats()])
        self.running = running if running is not None else (lambda: True)


class _EngineCollector(Collector):
    """Turns the engine's latest `EngineStats` into gauges and counters at scrape time."""

    def __init__(self, source: EngineSource, model_name: str) -> None:
        self._source = source
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        yield from self._totals(self._source.stats())
        yield from self._cores(self._source.core_stats())
        up = GaugeMetricFamily("glmv_engine_up", "1 while the engine runs, 0 once it stopped.", labels=["model_name"])
        up.add_metric([self._model], 1.0 if self._source.running() else 0.0)
        yield up

    def _cores(self, cores: list[EngineStats]) -> Iterator[Metric]:
        labels = ["model_name", "core"]
        families = (
            ("glmv_core_requests_running", "Sequences in the running batch of each engine core.", "num_running"),
            ("glmv_core_requests_waiting", "Sequences waiting to be scheduled on each engine core.", "num_waiting"),
            ("glmv_core_kv_cache_usage_ratio", "Fraction of each engine core's KV-cache blocks in use.", "kv_usage"),
        )
        for name, doc, attr in families:
            g = GaugeMetricFamily(name, doc, labels=labels)
            for i, core in enumerate(cores):
                g.add_metric([self._model, str(i)], float(getattr(core, attr)))
            yield g
        counters = (
            ("glmv_core_prefix_cache_queries", "Prefix-cache block lookups, per engine core.", "prefix_cache_queries"),
            ("glmv_core_prefix_cache_hits", "Prefix-cache block lookups that hit, per engine core.", "prefix_cache_hits"),
        )
        for name, doc, attr in counters:
            c = CounterMetricFamily(name, doc, labels=labels)
            for i, core in enumerate(cores):
                c.add_metric([self._model, str(i)], float(getattr(core, attr)))
            yield c

    def _totals(self, s: EngineStats) -> Iterator[Metric]:
        labels = ["model_name"]
        value = [self._model]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge(
            "glmv_requests_running",
            "Requests being generated (sequences in the running batch).",
            s.num_running,
        )
        yield gauge("glmv_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("glmv_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0 to 1).", s.kv_usage)
        yield gauge("glmv_kv_cache_blocks", "KV-cache blocks in total.", s.num_blocks)
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield gauge("glmv_prefix_cache_hit_rate", "Prefix-cache hits per query since start (0 to 1).", rate)
        yield counter("glmv_prefix_cache_queries", "Prefix-cache block lookups.", s.prefix_cache_queries)
        yield counter("glmv_prefix_cache_hits", "Prefix-cache block lookups that hit.", s.prefix_cache_hits)
        yield counter(
            "glmv_encoder_cache_hits", "Image embeddings served from the encoder cache.", s.encoder_cache_hits
        )
        yield counter(
            "glmv_encoder_cache_misses",
            "Image embeddings not found in the encoder cache.",
            s.encoder_cache_misses,
        )
        yield counter("glmv_images_encoded", "Images run through the vision encoder.", s.images_encoded)
        yield counter(
            "glmv_kernel_builds_after_startup",
            "GPU kernels built (compiled or loaded) by the engine cores after their start-up; "
            "each one delayed a request, so 0 is the expected value.",
            s.kernel_builds,
        )


class ServerMetrics:
    """All metrics of one app, in its own registry."""

    def __init__(self, engine: EngineSource | Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r = self.registry
        source = engine if isinstance(engine, EngineSource) else EngineSource(engine)
        r.register(_EngineCollector(source, model_name))
        lab = ["model_name"]
        self.ttft = Histogram(
            "glmv_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            lab,
            buckets=_TTFT_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.itl = Histogram(
            "glmv_inter_token_latency_seconds",
            "Time between successive generated tokens of a request.",
            lab,
            buckets=_ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.e2e = Histogram(
            "glmv_e2e_request_latency_seconds",
            "Time from arrival to the last token of a request.",
            lab,
            buckets=_E2E_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.queue_time = Histogram(
            "glmv_request_queue_time_seconds",
            "Time a request waited before it was first scheduled.",
            lab,
            buckets=_QUEUE_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.prompt_tokens = Counter(
            "glmv_prompt_tokens", "Prompt tokens of finished requests.", lab, registry=r
        ).labels(model_name)
        self.cached_prompt_tokens = Counter(
            "glmv_cached_prompt_tokens", "Prompt tokens served from the prefix cache.", lab, registry=r
        ).labels(model_name)
        self.generation_tokens = Counter(
            "glmv_generation_tokens", "Generated tokens (all choices).", lab, registry=r
        ).labels(model_name)
        self._finished = Counter(
            "glmv_requests_finished",
            "Chat requests by outcome: a finish reason, 'error', 'timeout' or 'aborted' (client left).",
            [*lab, "outcome"],
            registry=r,
        )
        self._http = Counter(
            "glmv_http_responses",
            "HTTP responses by method, route template and status code.",
            ["method", "route", "status"],
            registry=r,
        )

    def request_finished(self, outcome: str) -> None:
        self._finished.labels(self.model_name, outcome).inc()

    def http_response(self, method: str, route: str, status: int) -> None:
        """Count one response. `route` must be a route template (or "unmatched"); the method is
        folded into `HTTP_METHODS` and the status into 100..599, so labels form closed sets."""
        label = method if method in HTTP_METHODS else OTHER_METHOD
        code = status if 100 <= status <= 599 else 0
        self._http.labels(label, route, str(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
