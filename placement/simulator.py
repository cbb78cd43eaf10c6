"""Discrete-event replay of a workload against a placement, driving the real scheduler.

Each mesh runs its own `muxserve.scheduler.Scheduler` (the plan's engine settings; temporal
and spatial plans give every job the whole GPU, so SM admission runs one job at a time) over a
KV pool of the planned size. A clock advances by the cost model's latency of each job (slowed
when the jobs running at once ask for more than the GPU's SMs or HBM bandwidth), and dummy
tokens are fed back. Requests arrive through a warm-up and a measured window; the simulation
then runs on until they finish or can no longer meet their SLO. Reported per model, over the
window: throughput (tokens generated in the window ÷ the mean output length: requests/s served,
partial requests included, so a window shorter than a request still measures the rate),
SLO attainment of the window's arrivals, and TTFT / TPOT percentiles.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from muxserve.config import EngineConfig, SMShare
from muxserve.errors import RequestError
from muxserve.model_descriptor import ModelDescriptor, describe_model
from muxserve.request import Request
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, JobResult, Phase, SeqResult
from muxserve.scheduler.scheduler import Scheduler
from placement.plan import PlacedMesh, PlacedModel, Placement, mesh_pool_bytes
from placement.problem import Problem


@dataclass(frozen=True)
class ModelResult:
    """One model's results over the measured window."""

    name: str
    rate: float  # requested requests/s
    arrived: int  # requests that arrived in the window
    completed: int  # of those, finished (within or after the window)
    throughput: float  # requests/s served in the window (tokens ÷ mean output length)
    slo_attainment: float  # of the window's arrivals, the share finished within its SLO
    ttft_p50: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None


@dataclass(frozen=True)
class SimResult:
    """A placement's simulated service."""

    algorithm: str
    window_s: float
    models: tuple[ModelResult, ...]

    @property
    def throughput(self) -> float:
        return sum(m.throughput for m in self.models)

    @property
    def slo_attainment(self) -> float:
        """Over all requests of the window."""
        arrived = sum(m.arrived for m in self.models)
        good = sum(m.slo_attainment * m.arrived for m in self.models)
        return good / arrived if arrived else 1.0


@dataclass
class _Track:
    """Timestamps of one request."""

    model: str
    arrival: float
    in_window: bool  # arrived within its mesh's measured window
    first_token: float | None = None
    finish: float | None = None
    rejected: bool = False


@dataclass(order=True)
class _Running:
    end: float
    job_id: int
    job: Job = field(compare=False)
    sm: float = field(compare=False)
    hbm: float = field(compare=False)


def arrival_times(
    rate: float, duration: float, process: str, cv: float, rng: np.random.Generator
) -> list[float]:
    """Arrival times in [0, duration): Poisson, or gamma intervals with the given cv."""
    shape = 1.0 / (cv * cv) if process == "gamma" else 1.0
    scale = 1.0 / (rate * shape)
    out: list[float] = []
    t = 0.0
    while True:
        t += float(rng.gamma(shape, scale))
        if t >= duration:
            return out
        out.append(t)


def simulate(
    placement: Placement,
    problem: Problem,
    *,
    window_s: float = 20.0,
    min_warmup_s: float = 5.0,
    seed: int = 0,
    block_bytes: int | None = None,
    admission: bool = True,
    progress: Callable[[str], None] | None = None,
    settle: float = 1.2,
    drain: float = 2.0,
) -> SimResult:
    """Replay the problem's workload (Poisson or gamma) against `placement`.

    With `admission`, a model the plan serves below its rate turns the excess away on arrival
    (as a rate-limited server answers 429), so each plan is held to what it promises; turned
    away requests count against SLO attainment.

    Each mesh warms up for `settle` times its slowest model's planned request latency (so the
    window sees steady state, not the ramp-up), at least `min_warmup_s`; then `window_s` of
    arrivals are measured, and the mesh runs on until they can no longer meet their SLO, or
    for `drain` times their planned latency if that is sooner (a request later than that
    counts as a miss). Smaller `settle` and `drain` (1, 1) make a quick, slightly pessimistic
    simulation: what the benchmark's default run uses.
    """
    block_bytes = block_bytes or problem.engine.block_bytes  # the serving config's, by default
    tracks: dict[str, _Track] = {}
    tokens: dict[str, int] = {pm.name: 0 for pm in placement.models}
    windows = []
    for mesh in placement.meshes:
        warmup = max(
            min_warmup_s,
            min(_MAX_WARMUP_S, settle * max(_latency(problem, m) for m in mesh.models)),
        )
        windows.append((warmup, warmup + window_s))
    arrivals = _split_arrivals(placement, problem, windows, seed, admission)
    for k, mesh in enumerate(placement.meshes):
        if progress:
            progress(f"simulate {placement.algorithm}: mesh {k + 1}/{len(placement.meshes)}")
        tracks.update(
            _run_mesh(mesh, k, problem, windows[k], block_bytes, arrivals[k], tokens, drain)
        )
    stats = []
    rates = placement.rates()
    for name in sorted(rates, key=problem.index):  # one row per model, in the problem's order
        rate = rates[name]
        t = problem.targets[problem.index(name)]
        mine = [r for r in tracks.values() if r.model == name]
        served = tokens[name] / t.output_len / window_s
        stats.append(_stats(name, rate, mine, served, t.ttft, t.tpot, t.output_len))
    return SimResult(placement.algorithm, window_s, tuple(stats))


def _split_arrivals(
    placement: Placement,
    problem: Problem,
    windows: list[tuple[float, float]],
    seed: int,
    admission: bool,
) -> list[list[tuple[float, str, bool]]]:
    """Per mesh, its arrivals (time, model, admitted) up to the end of its window.

    A model's arrivals are drawn once (the same in every plan: common random numbers) and
    spread over its replicas in proportion to the rates the plan expects each to serve (a
    thinned Poisson process is Poisson). With `admission`, the share beyond what the plan
    serves in all is turned away.
    """
    out: list[list[tuple[float, str, bool]]] = [[] for _ in placement.meshes]
    places: dict[str, list[tuple[int, float]]] = {}
    for k, mesh in enumerate(placement.meshes):
        for pm in mesh.models:
            places.setdefault(pm.name, []).append((k, pm.served))
    arr = problem.arrival
    for name, where in places.items():
        i = problem.index(name)
        rate = problem.targets[i].rate
        until = max(windows[k][1] for k, _ in where)
        times = arrival_times(rate, until, arr.process, arr.cv, np.random.default_rng([seed, i]))
        draws = np.random.default_rng([seed, i, 1])
        served = np.array([x for _, x in where])
        total = float(served.sum())
        admit = draws.random(len(times)) < (min(1.0, total / rate) if admission else 1.0)
        weights = served / total if total > 0 else np.full(len(where), 1.0 / len(where))
        pick = draws.choice(len(where), size=len(times), p=weights)
        for at, ok, r in zip(times, admit, pick, strict=True):
            k = where[int(r)][0]
            if at < windows[k][1]:
                out[k].append((at, name, bool(ok)))
    for mesh_arrivals in out:
        mesh_arrivals.sort()
    return out


_MAX_WARMUP_S = 120.0


def _latency(problem: Problem, m: PlacedModel) -> float:
    """A request's planned latency: its prefill, then its decode steps at the planned pace."""
    return m.ttft + problem.targets[problem.index(m.name)].decode_steps * m.tpot


def _run_mesh(
    mesh: PlacedMesh,
    mesh_index: int,
    problem: Problem,
    window: tuple[float, float],
    block_bytes: int,
    arrivals: list[tuple[float, str, bool]],
    tokens: dict[str, int],
    drain: float,
) -> dict[str, _Track]:
    """Simulate one mesh; adds to `tokens` each model's tokens generated in `window`."""
    cost, tp = problem.cost, mesh.size
    duration = window[1]
    engine = problem.engine.model_copy(update={"block_bytes": block_bytes})
    specs = {pm.name: problem.specs[problem.index(pm.name)] for pm in mesh.models}
    models, num_blocks = served_mesh(mesh, problem, block_bytes)
    slots = [replace(d.slot, max_waiting=1 << 30) for d in models]  # queues never refuse
    sched = Scheduler.create(slots, num_blocks, EngineConfig.model_validate(engine.model_dump()))

    tracks: dict[str, _Track] = {}
    running: list[_Running] = []
    ids = itertools.count()
    hbm = problem.cluster.gpu.hbm_bytes_per_s * problem.cluster.cost_model.bandwidth_efficiency
    horizon = duration + _drain(problem, mesh, duration, drain)
    now, a = 0.0, 0
    while now < horizon:
        while a < len(arrivals) and arrivals[a][0] <= now:
            at, name, admitted = arrivals[a]
            a += 1
            t = problem.targets[problem.index(name)]
            rid = f"m{mesh_index}-r{next(ids)}"
            tracks[rid] = _Track(name, at, window[0] <= at < window[1])
            if not admitted:  # beyond the rate the plan serves: turned away (HTTP 429)
                tracks[rid].rejected = True
                continue
            req = Request(
                rid,
                name,
                [1] * t.prompt_len,
                SamplingParams(max_tokens=t.output_len, ignore_eos=True),
                at,
                0,
            )
            try:
                sched.add_request(req)
            except RequestError:
                tracks[rid].rejected = True
        for job in sched.schedule():
            spec = specs[job.model]
            if job.phase is Phase.PREFILL:
                n = len(job.seqs)
                lat = cost.prefill_latency(spec, tp, job.sm_share, n, job.num_tokens / n)
                moved = cost.prefill_bytes(spec, tp, n, job.num_tokens / n)
            else:
                ctx = sum(s.end_pos for s in job.seqs) / len(job.seqs)
                lat = cost.decode_latency(spec, tp, job.sm_share, len(job.seqs), ctx)
                moved = cost.decode_bytes(spec, tp, len(job.seqs), ctx)
            bw = moved / lat / hbm
            slow = max(
                1.0, job.sm_share + sum(r.sm for r in running), bw + sum(r.hbm for r in running)
            )
            heapq.heappush(running, _Running(now + lat * slow, job.job_id, job, job.sm_share, bw))
        next_arrival = arrivals[a][0] if a < len(arrivals) else float("inf")
        if not running and next_arrival == float("inf"):
            break
        if running and running[0].end <= next_arrival:
            done = heapq.heappop(running)
            now = done.end
            if window[0] <= now < window[1]:
                tokens[done.job.model] += sum(s.sample for s in done.job.seqs)
            result = JobResult(
                done.job.job_id,
                tuple(SeqResult(s.request_id, 0 if s.sample else None) for s in done.job.seqs),
            )
            for req in sched.on_job_done(done.job, result):
                tr = tracks[req.request_id]
                if tr.first_token is None and req.output_token_ids:
                    tr.first_token = now
                if req.is_finished:
                    tr.finish = now
        else:
            now = next_arrival
    return tracks


def served_mesh(
    mesh: PlacedMesh, problem: Problem, block_bytes: int | None = None
) -> tuple[list[ModelDescriptor], int]:
    """What the engine serving `mesh` derives from the plan: each model's descriptors (dtype,
    one rank's KV layout, shares) and the blocks of its KV pool (`num_blocks` per GPU).

    The same `describe_model` the engine calls, on the facts `to_config` writes for the mesh,
    so the simulated scheduler sees the blocks the served one will.
    """
    block_bytes = block_bytes or problem.engine.block_bytes
    models = []
    for pm in mesh.models:
        spec = problem.specs[problem.index(pm.name)]
        models.append(
            describe_model(
                pm.name,
                spec.config,
                spec.dtype,
                block_bytes=block_bytes,
                tensor_parallel=pm.tensor_parallel,
                sm_share=SMShare(prefill=pm.prefill_share, decode=pm.decode_share),
                rate=pm.serving_rate,
                kv_share=pm.kv_share,
                max_model_len=(spec.max_model_len, problem.engine.max_model_len),
            )
        )
    pool = mesh.kv_pool_bytes
    if pool is None:  # a placement built by hand: size it as `assemble` does
        pool = mesh_pool_bytes(
            problem,
            [(problem.specs[problem.index(m.name)], m.tensor_parallel) for m in mesh.models],
        )
    return models, pool // block_bytes


def _drain(problem: Problem, mesh: PlacedMesh, duration: float, factor: float) -> float:
    """How long to run on after the last arrival: until a request can no longer meet its SLO,
    or has taken `factor` times its planned latency (a request that far behind the plan is
    counted as a miss: this spares simulating the long tail of a generous SLO)."""
    longest = 0.0
    for m in mesh.models:
        t = problem.targets[problem.index(m.name)]
        planned = factor * _latency(problem, m)
        if t.ttft is None or t.tpot is None:
            longest = max(longest, min(duration, planned))
            continue
        longest = max(longest, min(1.05 * (t.ttft + t.decode_steps * t.tpot), planned))
    return longest


def _stats(
    name: str,
    rate: float,
    tracks: list[_Track],
    served: float,
    slo_ttft: float | None,
    slo_tpot: float | None,
    output_len: int,
) -> ModelResult:
    arrived = [r for r in tracks if r.in_window]
    done = [r for r in arrived if r.finish is not None and r.first_token is not None]
    ttft = np.array([r.first_token - r.arrival for r in done])  # type: ignore[operator]
    steps = max(output_len - 1, 1)
    tpot = np.array([(r.finish - r.first_token) / steps for r in done])  # type: ignore[operator]
    good = 0
    for x, y in zip(ttft, tpot, strict=True):
        good += (slo_ttft is None or x <= slo_ttft) and (slo_tpot is None or y <= slo_tpot)

    def pct(xs: np.ndarray, q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs.size else None

    return ModelResult(
        name=name,
        rate=rate,
        arrived=len(arrived),
        completed=len(done),
        throughput=served,
        slo_attainment=good / len(arrived) if arrived else 1.0,
        ttft_p50=pct(ttft, 50),
        ttft_p99=pct(ttft, 99),
        tpot_p50=pct(tpot, 50),
        tpot_p99=pct(tpot, 99),
    )
