"""Prometheus metrics of one server, in a registry of its own (never the process-global one).

vLLM's metric set under our prefix (`muxserve:` for `vllm:`, the same `model_name` label), so
its dashboards and autoscaling rules carry over; the README maps every name. Queue lengths,
KV usage, preemptions and mesh states are read through the `EngineClient` at scrape time, one
series per (model, mesh); token counts and latencies are recorded by the handlers as outputs
reach them, so they include the HTTP side (and the router's hop). Our own pool gauges
(`muxserve_kv_blocks_*`, `muxserve_mesh_*`) keep their names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from muxserve.client.protocol import Health, MeshState, MeshStats
from muxserve.residency import WAKE_BUCKETS, ModelState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "muxserve:"  # vLLM's names, with our prefix for vLLM's
# vLLM's buckets
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)


def token_buckets(max_len: int) -> tuple[int, ...]:
    """vLLM's 1-2-5 buckets up to `max_len` (1, 2, 5, 10, 20, 50, ...)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class EngineCollector(Collector):
    """Per-model scheduler state and per-mesh pool and health, from the last snapshot given."""

    def __init__(self) -> None:
        self.stats: Sequence[MeshStats] = ()
        self.health = Health()

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "mesh"]
        running = GaugeMetricFamily(
            f"{PREFIX}num_requests_running", "Requests holding KV blocks", labels=labels
        )
        waiting = GaugeMetricFamily(
            f"{PREFIX}num_requests_waiting", "Requests queued for admission", labels=labels
        )
        usage = GaugeMetricFamily(
            f"{PREFIX}kv_cache_usage_perc",
            "Share of the mesh's KV pool the model holds (1: all of it); a mesh's models sum "
            "to the pool's usage",
            labels=labels,
        )
        preempted = CounterMetricFamily(
            f"{PREFIX}num_preemptions",
            "Requests preempted (recomputed later), since the mesh started",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "muxserve_kv_blocks_used", "KV blocks the model holds", labels=["model", "mesh"]
        )
        quota = GaugeMetricFamily(
            "muxserve_kv_blocks_quota",
            "KV blocks the model may hold now",
            labels=["model", "mesh"],
        )
        total = GaugeMetricFamily(
            "muxserve_kv_blocks_total", "KV blocks in the pool", labels=["mesh"]
        )
        free = GaugeMetricFamily("muxserve_kv_blocks_free", "KV blocks free", labels=["mesh"])
        for mesh in self.stats:
            for model, st in mesh.models.items():
                key = [model, mesh.mesh]
                running.add_metric(key, st.running)
                waiting.add_metric(key, st.waiting)
                usage.add_metric(
                    key, st.blocks_used / mesh.blocks_total if mesh.blocks_total else 0
                )
                preempted.add_metric(key, st.preemptions)
                used.add_metric(key, st.blocks_used)
                quota.add_metric(key, st.blocks_quota)
            total.add_metric([mesh.mesh], mesh.blocks_total)
            free.add_metric([mesh.mesh], mesh.blocks_free)
        yield from (running, waiting, usage, preempted, used, quota, total, free)
        yield from self._residency()
        up = GaugeMetricFamily("muxserve_mesh_up", "1 while the mesh serves", labels=["mesh"])
        restarts = CounterMetricFamily(
            "muxserve_mesh_restarts", "Times the mesh was restarted after dying", labels=["mesh"]
        )
        resubmitted = CounterMetricFamily(
            "muxserve_mesh_requests_resubmitted",
            "Requests the mesh lost before any output that the router sent to another replica",
            labels=["mesh"],
        )
        for name, h in self.health.meshes.items():
            up.add_metric([name], 1.0 if h.state is MeshState.OK else 0.0)
            restarts.add_metric([name], h.restarts)
            resubmitted.add_metric([name], h.resubmitted)
        yield from (up, restarts, resubmitted)

    def _residency(self) -> Iterator[Metric]:
        """Each model's state (1 for the current one), its sleeps, wakes and wake times."""
        state = GaugeMetricFamily(
            f"{PREFIX}model_state",
            "1 for the model's current state on the mesh (awake, asleep, waking, sleeping)",
            labels=["model_name", "mesh", "state"],
        )
        sleeps = CounterMetricFamily(
            f"{PREFIX}model_sleeps",
            "Times the model was put to sleep",
            labels=["model_name", "mesh"],
        )
        wakes = CounterMetricFamily(
            f"{PREFIX}model_wakes", "Times the model was woken", labels=["model_name", "mesh"]
        )
        wake_s = HistogramMetricFamily(
            f"{PREFIX}model_wake_seconds",
            "Seconds a wake took (weights back on the device)",
            labels=["model_name", "mesh"],
        )
        for mesh in self.stats:
            for model, current in mesh.states.items():
                for s in ModelState:
                    state.add_metric([model, mesh.mesh, s.value], 1.0 if s is current else 0.0)
            for model, w in mesh.wakes.items():
                key = [model, mesh.mesh]
                sleeps.add_metric(key, w.sleeps)
                wakes.add_metric(key, w.wakes)
                counts = w.wake_buckets or (0,) * len(WAKE_BUCKETS)
                buckets = [(f"{le:g}", c) for le, c in zip(WAKE_BUCKETS, counts, strict=True)]
                wake_s.add_metric(key, [*buckets, ("+Inf", w.wakes)], w.wake_seconds)
        yield from (state, sleeps, wakes, wake_s)


@dataclass(frozen=True)
class ModelMetrics:
    """One model's series, looked up once (a `labels()` call per token adds up)."""

    prompt_tokens: Counter
    generation_tokens: Counter
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue: Histogram
    prefill: Histogram
    decode: Histogram
    inference: Histogram
    wake: Histogram
    request_prompt_tokens: Histogram
    request_generation_tokens: Histogram
    params_n: Histogram
    params_max_tokens: Histogram


class ServerMetrics:
    """The counters and histograms the handlers feed, and the scrape of all of them."""

    def __init__(self, models: Sequence[str], max_model_len: int = 1 << 20) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        label = ["model_name"]
        tokens = token_buckets(max_model_len)

        def counter(name: str, doc: str, labels: list[str] = label) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, label, buckets=buckets, registry=r)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.requests = counter(
            "request_success",
            "Finished requests (one per choice) by finish reason",
            ["model_name", "finished_reason"],
        )
        ttft = histogram(
            "time_to_first_token_seconds",
            "From the HTTP request's arrival to its first token",
            TTFT_BUCKETS,
        )
        itl = histogram(
            "inter_token_latency_seconds", "Between consecutive tokens of a request", ITL_BUCKETS
        )
        e2e = histogram(
            "e2e_request_latency_seconds",
            "From the HTTP request's arrival to its last token",
            REQUEST_BUCKETS,
        )
        queue = histogram(
            "request_queue_time_seconds",
            "From the engine's receipt to first admission (WAITING)",
            REQUEST_BUCKETS,
        )
        prefill = histogram(
            "request_prefill_time_seconds",
            "From admission to the first token (PREFILL)",
            REQUEST_BUCKETS,
        )
        decode = histogram(
            "request_decode_time_seconds",
            "From the first token to the last (DECODE)",
            REQUEST_BUCKETS,
        )
        inference = histogram(
            "request_inference_time_seconds",
            "From admission to the last token (RUNNING)",
            REQUEST_BUCKETS,
        )
        wake = histogram(
            "request_wake_time_seconds",
            "Of a request's queue time, the wait for its sleeping model to wake (requests that "
            "found it asleep only); its TTFT includes it",
            REQUEST_BUCKETS,
        )
        req_prompt = histogram("request_prompt_tokens", "Prompt tokens per request", tokens)
        req_gen = histogram("request_generation_tokens", "Tokens generated per request", tokens)
        params_n = histogram("request_params_n", "The n request parameter", N_BUCKETS)
        params_max = histogram(
            "request_params_max_tokens", "The max_tokens request parameter", tokens
        )
        self.http_responses = Counter(
            "muxserve_http_responses",
            "HTTP responses by route and status (499: the client went away)",
            ["route", "status"],
            registry=r,
        )
        # every model's series exists from the start, at 0
        self.models = {
            m: ModelMetrics(
                self.prompt_tokens.labels(m),
                self.generation_tokens.labels(m),
                ttft.labels(m),
                itl.labels(m),
                e2e.labels(m),
                queue.labels(m),
                prefill.labels(m),
                decode.labels(m),
                inference.labels(m),
                wake.labels(m),
                req_prompt.labels(m),
                req_gen.labels(m),
                params_n.labels(m),
                params_max.labels(m),
            )
            for m in models
        }
        self.engines = EngineCollector()
        r.register(self.engines)

    def on_protocol_error(self, status: int) -> None:
        """Count the answer to a request aiohttp could not parse (no route: "malformed")."""
        self.http_responses.labels("malformed", str(status)).inc()

    def on_response(self, request: web.Request, status: int) -> None:
        """Count a response under its route's pattern (not the raw path: bounded labels)."""
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        self.http_responses.labels(name, str(status)).inc()

    def render(self, stats: Sequence[MeshStats], health: Health) -> bytes:
        """The exposition text, with the engines' state as of `stats` and `health`."""
        self.engines.stats, self.engines.health = stats, health
        return generate_latest(self.registry)
