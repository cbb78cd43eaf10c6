"""Prometheus metrics of one server, in a registry of its own (never the process-global one).

Queue lengths, KV blocks and mesh states are read through the `EngineClient` at scrape time,
one series per (model, mesh); token counts and latencies are recorded by the handlers as
outputs reach them, so they include the HTTP side (and the router's hop).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from muxserve.client.protocol import Health, MeshState, MeshStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300)


class EngineCollector(Collector):
    """Per-model scheduler state and per-mesh pool and health, from the last snapshot given."""

    def __init__(self) -> None:
        self.stats: Sequence[MeshStats] = ()
        self.health = Health()

    def collect(self) -> Iterator[Metric]:
        per_model = {
            "running": GaugeMetricFamily(
                "muxserve_requests_running", "Requests holding KV blocks", labels=["model", "mesh"]
            ),
            "waiting": GaugeMetricFamily(
                "muxserve_requests_waiting",
                "Requests queued for admission",
                labels=["model", "mesh"],
            ),
            "blocks_used": GaugeMetricFamily(
                "muxserve_kv_blocks_used", "KV blocks the model holds", labels=["model", "mesh"]
            ),
            "blocks_quota": GaugeMetricFamily(
                "muxserve_kv_blocks_quota",
                "KV blocks the model may hold now",
                labels=["model", "mesh"],
            ),
        }
        total = GaugeMetricFamily(
            "muxserve_kv_blocks_total", "KV blocks in the pool", labels=["mesh"]
        )
        free = GaugeMetricFamily("muxserve_kv_blocks_free", "KV blocks free", labels=["mesh"])
        preempted = CounterMetricFamily(
            "muxserve_preemptions", "Requests preempted (recomputed later)", labels=["mesh"]
        )
        for mesh in self.stats:
            for model, st in mesh.models.items():
                per_model["running"].add_metric([model, mesh.mesh], st.running)
                per_model["waiting"].add_metric([model, mesh.mesh], st.waiting)
                per_model["blocks_used"].add_metric([model, mesh.mesh], st.blocks_used)
                per_model["blocks_quota"].add_metric([model, mesh.mesh], st.blocks_quota)
            total.add_metric([mesh.mesh], mesh.blocks_total)
            free.add_metric([mesh.mesh], mesh.blocks_free)
            preempted.add_metric([mesh.mesh], mesh.preemptions)
        yield from per_model.values()
        yield from (total, free, preempted)
        up = GaugeMetricFamily("muxserve_mesh_up", "1 while the mesh serves", labels=["mesh"])
        restarts = CounterMetricFamily(
            "muxserve_mesh_restarts", "Times the mesh was restarted after dying", labels=["mesh"]
        )
        for name, h in self.health.meshes.items():
            up.add_metric([name], 1.0 if h.state is MeshState.OK else 0.0)
            restarts.add_metric([name], h.restarts)
        yield from (up, restarts)


@dataclass(frozen=True)
class ModelMetrics:
    """One model's series, looked up once (a `labels()` call per token adds up)."""

    prompt_tokens: Counter
    generation_tokens: Counter
    ttft: Histogram
    itl: Histogram
    e2e: Histogram


class ServerMetrics:
    """The counters and histograms the handlers feed, and the scrape of all of them."""

    def __init__(self, models: Sequence[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter(
            "muxserve_prompt_tokens", "Prompt tokens of admitted requests", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "muxserve_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.requests = Counter(
            "muxserve_requests",
            "Finished requests (one per choice) by finish reason",
            ["model", "finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "muxserve_time_to_first_token_seconds",
            "From the HTTP request's arrival to its first token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "muxserve_inter_token_latency_seconds",
            "Between consecutive tokens of a request",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "muxserve_e2e_request_latency_seconds",
            "From the HTTP request's arrival to its last token",
            ["model"],
            buckets=E2E_BUCKETS,
            registry=r,
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
                self.ttft.labels(m),
                self.itl.labels(m),
                self.e2e.labels(m),
            )
            for m in models
        }
        self.engines = EngineCollector()
        r.register(self.engines)

    def on_response(self, request: web.Request, status: int) -> None:
        """Count a response under its route's pattern (not the raw path: bounded labels)."""
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        self.http_responses.labels(name, str(status)).inc()

    def render(self, stats: Sequence[MeshStats], health: Health) -> bytes:
        """The exposition text, with the engines' state as of `stats` and `health`."""
        self.engines.stats, self.engines.health = stats, health
        return generate_latest(self.registry)
