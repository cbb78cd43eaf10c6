"""Discrete-event replay of a workload against a placement, driving the real scheduler.

Each mesh runs its own `muxserve.scheduler.Scheduler` (the plan's engine settings; temporal
and spatial plans give every job the whole GPU, so SM admission runs one job at a time) over a
KV pool of the planned size (`placement.mesh_replay`). A clock advances by the cost model's
latency of each job, slowed by the jobs running beside it as the contention mode says
(`placement.contention`: by default they share the SMs and the HBM bandwidth, re-paced at
every job's start and end), and dummy tokens are fed back. Requests arrive through a warm-up
and a measured window; the simulation then runs on until they finish or can no longer meet
their SLO. Reported per model, over the window: throughput (tokens generated in the window ÷
the mean output length: requests/s served, partial requests included, so a window shorter
than a request still measures the rate), SLO attainment of the window's arrivals, and TTFT /
TPOT percentiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from placement.contention import CONTENTION_MODES, Contention
from placement.mesh_replay import MeshRun, Track, planned_latency, replay_mesh
from placement.plan import Placement
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
    contention: str = "shared"  # how jobs running at once slowed each other
    contended_meshes: int = 0  # meshes where some job ran slower than alone

    @property
    def throughput(self) -> float:
        return sum(m.throughput for m in self.models)

    @property
    def slo_attainment(self) -> float:
        """Over all requests of the window."""
        arrived = sum(m.arrived for m in self.models)
        good = sum(m.slo_attainment * m.arrived for m in self.models)
        return good / arrived if arrived else 1.0


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
    contention: Contention = "shared",
    cache: MeshCache | None = None,
    model_warmup: bool = True,
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
    simulation: what the benchmark's default run uses. With `model_warmup`, each model's
    arrivals begin only its own warm-up (`settle` × its planned latency, at least
    `min_warmup_s`) before the window, so a busy model with short requests is not replayed
    through the long warm-up of a slow one beside it (it reaches its steady state by the
    window all the same); without, every model's arrivals begin at 0 (results before it).

    `contention` (`none`, `start`, `shared`; see `placement.contention`): how jobs running at
    once slow each other; `start` is the model of results before `shared` existed. With a
    `cache` (one per problem), a mesh replayed before with the same models, arrivals and
    settings is not replayed again: the result is the same, so plans that share meshes, and
    the two contention modes on meshes where no job was ever slowed, cost one replay.
    """
    if contention not in CONTENTION_MODES:
        raise ValueError(f"contention must be one of {CONTENTION_MODES}, got {contention!r}")
    if cache is not None and cache.problem is not problem:
        raise ValueError("a MeshCache holds one problem's replays; make one per problem")
    block_bytes = block_bytes or problem.engine.block_bytes  # the serving config's, by default
    tracks: list[Track] = []
    tokens: dict[str, int] = {pm.name: 0 for pm in placement.models}
    windows: list[tuple[float, float]] = []
    starts: list[dict[str, float]] = []  # per mesh, when each model's arrivals begin
    for mesh in placement.meshes:
        ramp = {m.name: max(min_warmup_s, min(_MAX_WARMUP_S, settle * planned_latency(problem, m)))
                for m in mesh.models}  # fmt: skip
        warmup = max(ramp.values())
        windows.append((warmup, warmup + window_s))
        starts.append({n: warmup - r for n, r in ramp.items()} if model_warmup else {})
    arrivals = _split_arrivals(placement, problem, windows, starts, seed, admission)
    contended = 0
    for k, mesh in enumerate(placement.meshes):
        if progress:
            progress(f"simulate {placement.algorithm}: mesh {k + 1}/{len(placement.meshes)}")
        key = (mesh.size, mesh.models, mesh.kv_pool_bytes, windows[k], block_bytes, drain,
               tuple(arrivals[k]))  # fmt: skip
        run = cache.get(contention, key) if cache is not None else None
        if run is None:
            run = replay_mesh(
                mesh, problem, windows[k], block_bytes, arrivals[k], drain, contention
            )
            if cache is not None:
                cache.put(contention, key, run)
        tracks += run.tracks
        for name, n in run.tokens.items():
            tokens[name] += n
        contended += run.contended
    stats = []
    rates = placement.rates()
    for name in sorted(rates, key=problem.index):  # one row per model, in the problem's order
        rate = rates[name]
        t = problem.targets[problem.index(name)]
        mine = [r for r in tracks if r.model == name]
        served = tokens[name] / t.output_len / window_s
        stats.append(_stats(name, rate, mine, served, t.ttft, t.tpot, t.output_len))
    return SimResult(placement.algorithm, window_s, tuple(stats), contention, contended)


def _split_arrivals(
    placement: Placement,
    problem: Problem,
    windows: list[tuple[float, float]],
    starts: list[dict[str, float]],
    seed: int,
    admission: bool,
) -> list[list[tuple[float, str, bool]]]:
    """Per mesh, its arrivals (time, model, admitted) from each model's start (`starts`, 0
    where not given) up to the end of its window.

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
            if starts[k].get(name, 0.0) <= at < windows[k][1]:
                out[k].append((at, name, bool(ok)))
    for mesh_arrivals in out:
        mesh_arrivals.sort()
    return out


_MAX_WARMUP_S = 120.0


class MeshCache:
    """Mesh replays of one problem, by what they depend on, for plans simulated in turn.

    A replay that never slowed a job is also the replay without contention.
    """

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self._runs: dict[tuple[str, tuple], MeshRun] = {}
        self.hits = 0
        self.misses = 0

    def get(self, contention: Contention, key: tuple) -> MeshRun | None:
        run = self._runs.get((contention, key))
        self.hits += run is not None
        self.misses += run is None
        return run

    def put(self, contention: Contention, key: tuple, run: MeshRun) -> None:
        self._runs[(contention, key)] = run
        if not run.contended:
            self._runs.setdefault(("none", key), run)


def _stats(
    name: str,
    rate: float,
    tracks: list[Track],
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
