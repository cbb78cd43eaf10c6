"""Per (model, mesh size, SM level): what the model would serve there and what it would use.

The whole cost model, reduced to a table. Under spatial-temporal multiplexing ("mux") a model's
decode job holds its SM share for good (decodes run back to back), and gets the HBM bandwidth
that share reaches; its prefills run beside the decodes on the SMs they leave. Under temporal
multiplexing a model owns the whole mesh for a fraction of the time. Either way a candidate's
use of each mesh resource is a constant, so a mesh is feasible when the uses add up to at most
its capacity — which is what makes the exact ILP and the exhaustive check in the tests simple.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from placement.deadline import Deadline
from placement.problem import Problem

RESOURCES = ("memory", "sm", "hbm", "admission")


class Mode(enum.Enum):
    MUX = "mux"  # spatial-temporal: jobs of all models run at once, each in its SM share
    TEMPORAL = "temporal"  # one job at a time on the whole mesh


@dataclass(frozen=True)
class Candidate:
    """Model `model` on a mesh of `size` GPUs at `share` (decode SM share, or time share),
    serving `served` requests/s: all it can there, or a planned fraction of that (to leave
    memory and SMs to others when the cluster cannot serve everyone)."""

    model: int
    size: int
    share: float
    served: float  # requests/s it serves: min(rate, capacity at this share)
    batch: float  # mean decode batch at that rate
    tpot: float  # decode step latency at that batch (s)
    ttft: float  # prefill latency of one prompt at the least prefill share (s)
    kv_bytes: float  # KV bytes per GPU its running requests hold (mean + 2 std. dev.)
    use: tuple[float, float, float, float]  # per GPU: memory bytes, SM, HBM, decode SM admitted
    replica: int = 0  # which of the model's replicas (0: the one every plan must place)


@dataclass(frozen=True)
class Capacity:
    """What one GPU of a mesh offers, in the units of `Candidate.use`."""

    memory: float
    sm: float
    hbm: float
    admission: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.memory, self.sm, self.hbm, self.admission)


class CandidateTable:
    """The candidates of every (model, mesh size), with dominated ones removed.

    A model may have replicas (`replicas(i)` > 1): copies of it that further meshes may host,
    each with the model's candidates, their served rates adding up to at most its rate. A
    *unit* is one (model, replica); replica 0 of every model must be placed, the others may.
    """

    def __init__(
        self,
        problem: Problem,
        mode: Mode,
        capacity: Capacity,
        options: dict[tuple[int, int], tuple[Candidate, ...]],
        replicas: dict[int, int] | None = None,
    ) -> None:
        self.problem = problem
        self.mode = mode
        self.capacity = capacity
        self._options = options
        self._replicas = {i: k for i, k in (replicas or {}).items() if k > 1}
        self.units: list[tuple[int, int]] = [
            (i, j) for i in range(problem.num_models) for j in range(self.replicas(i))
        ]
        self._unit = {u: k for k, u in enumerate(self.units)}
        self._copies: dict[tuple[int, int, int], tuple[Candidate, ...]] = {}

    def options(self, model: int, size: int, replica: int = 0) -> tuple[Candidate, ...]:
        """Candidates of a model (or one of its replicas) on a mesh size, most served first."""
        base = self._options.get((model, size), ())
        if replica == 0 or not base:
            return base
        key = (model, size, replica)
        if key not in self._copies:
            self._copies[key] = tuple(replace(c, replica=replica) for c in base)
        return self._copies[key]

    def sizes(self, model: int) -> list[int]:
        return [s for s in self.problem.mesh_sizes if self._options.get((model, s))]

    def replicas(self, model: int) -> int:
        """How many meshes may host the model (1: no replicas)."""
        return self._replicas.get(model, 1)

    @property
    def replicated(self) -> bool:
        return bool(self._replicas)

    def unit(self, c: Candidate) -> int:
        """The index in `units` of the (model, replica) a candidate places."""
        return self._unit[(c.model, c.replica)]

    def fits(self, cands: Iterable[Candidate]) -> bool:
        """Whether these candidates fit together on one mesh."""
        return fits(cands, self.capacity)

    def __len__(self) -> int:
        return sum(len(v) for v in self._options.values())


FIT_SLACK = 1e-9  # a mesh fits with Σ use ≤ cap·(1 + FIT_SLACK) + FIT_SLACK: rounding aside


def room(capacity: Capacity | tuple[float, float, float, float]) -> list[float]:
    """Per resource, the most the candidates of one fitting mesh may use together (the
    capacity less nothing but rounding): the one place the fit slack is written out."""
    caps = capacity.as_tuple() if isinstance(capacity, Capacity) else capacity
    return [cap * (1 + FIT_SLACK) + FIT_SLACK for cap in caps]


def fits(cands: Iterable[Candidate], capacity: Capacity) -> bool:
    """Whether `cands` fit one mesh of `capacity` together."""
    total = [0.0, 0.0, 0.0, 0.0]
    for c in cands:
        for k in range(4):
            total[k] += c.use[k]
    return all(t <= r for t, r in zip(total, room(capacity), strict=True))


def mesh_capacity(problem: Problem, mode: Mode) -> Capacity:
    """Per GPU: usable memory; SM time and HBM time up to the planned utilization; decode
    shares within the SM admission limit less the SMs kept for a prefill (mux), or
    unconstrained (temporal, where jobs take turns)."""
    busy = problem.params.max_utilization
    if mode is Mode.TEMPORAL:
        return Capacity(problem.usable_memory, busy, busy, 1.0)
    admission = problem.sm_limit - problem.params.min_prefill_share
    return Capacity(problem.usable_memory, busy, busy, admission)


def build_candidates(
    problem: Problem,
    mode: Mode = Mode.MUX,
    prune: bool = True,
    *,
    max_replicas: int | None = None,
    deadline: Deadline | None = None,
) -> CandidateTable:
    """Evaluate the cost model at every (model, mesh size, level); drop dominated candidates.

    With `max_replicas` > 1 (default: the planner's `max_replicas`), a model whose smallest
    mesh cannot serve its rate alone gets up to that many replicas, as many as its rate needs
    at what that mesh serves. A `deadline` that passes raises `PlanningTimeout`.
    """
    cap = mesh_capacity(problem, mode)
    deadline = deadline or Deadline.never()
    shapes: dict[tuple, _Shape | None] = {}  # models of one architecture and target share them
    evals: dict[tuple, tuple] = {}  # and, at one served rate, their batch, latency and uses
    options: dict[tuple[int, int], tuple[Candidate, ...]] = {}
    for i in range(problem.num_models):
        deadline.check(f"evaluating the cost model (model {i + 1} of {problem.num_models})")
        for size in problem.mesh_sizes:
            if not problem.fits(i, size):
                continue
            found = [
                c
                for share in problem.params.sm_levels
                for c in _candidates(problem, mode, cap, i, size, share, shapes, evals)
            ]
            if prune:
                found = _pareto(found)
            found.sort(key=lambda c: (-c.served, c.use))
            if found:
                options[(i, size)] = tuple(found)
    limit = problem.params.max_replicas if max_replicas is None else max_replicas
    replicas = {}
    if limit > 1:
        for i in range(problem.num_models):
            small = [s for s in problem.mesh_sizes if options.get((i, s))]
            alone = [c.served for c in options.get((i, small[0]), ()) if fits([c], cap)]
            most = max(alone, default=0.0)
            if small and most > 0 and most < problem.targets[i].rate * (1 - 1e-9):
                replicas[i] = min(limit, math.ceil(problem.targets[i].rate / most - 1e-9))
    return CandidateTable(problem, mode, cap, options, replicas)


@dataclass(frozen=True)
class _Shape:
    """What a model can do at one (mesh size, share), whatever its rate."""

    max_batch: int
    capacity: float  # requests/s at the largest batch
    ttft: float
    prefill_s: float  # SM-seconds (at the full share) of one request's prefill
    prefill_hbm: float  # HBM-seconds of one request's prefill


def _candidates(
    p: Problem,
    mode: Mode,
    cap: Capacity,
    i: int,
    size: int,
    share: float,
    shapes: dict[tuple, _Shape | None],
    evals: dict[tuple, tuple] | None = None,
) -> list[Candidate]:
    """The candidates at one share: serving all it can, and the service levels below.

    `evals` memoizes a candidate's batch, latency and uses by (shape, served rate): models
    of one architecture and target that serve the same rate there (every model a share
    cannot serve in full serves its capacity) are evaluated once."""
    spec, t, cost = p.specs[i], p.targets[i], p.cost
    if mode is Mode.MUX and share > cap.admission + 1e-12:
        return []
    key = (repr(spec.config), spec.dtype, t.prompt_len, t.output_len, t.ttft, t.tpot, size, share)
    if key not in shapes:
        shapes[key] = _shape(p, mode, i, size, share)
    shape = shapes[key]
    if shape is None:
        return []
    fixed = cost.fixed_bytes(spec, size, p.engine)
    kv_per_req = p.kv_bytes_per_request(i) / size  # per GPU
    ctx = t.mean_context
    step = _step(p, mode, i, size, share)
    hbm_rate = p.cluster.gpu.hbm_bytes_per_s * p.cluster.cost_model.bandwidth_efficiency
    out = []
    evals = {} if evals is None else evals
    for level in p.params.service_levels:
        served = level * min(t.rate, shape.capacity)
        known = evals.get((mode, key, served))
        if known is not None:
            out.append(Candidate(i, size, share, served, *known))
            continue
        batch = _batch_at(served * t.decode_steps, step, shape.max_batch)
        tpot = step(batch)
        # KV for the mean batch and two standard deviations more: the number of requests
        # decoding at once is Poisson (M/G/inf), and a model out of blocks stalls its queue
        kv = (batch + 2 * math.sqrt(batch)) * kv_per_req
        busy = 1.0 - math.exp(-batch)  # P(some request is decoding), M/G/inf with mean `batch`
        if mode is Mode.MUX:
            decode_hbm = busy * cost.decode_bytes(spec, size, batch, ctx) / tpot / hbm_rate
            sm_time = busy * share + served * shape.prefill_s
            use = (fixed + kv, sm_time, decode_hbm + served * shape.prefill_hbm, share)
        else:
            turns = busy * share + served * shape.prefill_s  # its decode turns and prefills
            use = (fixed + kv, turns, turns, 0.0)
        evals[(mode, key, served)] = (batch, tpot, shape.ttft, kv, use)
        out.append(Candidate(i, size, share, served, batch, tpot, shape.ttft, kv, use))
    return out


def _step(p: Problem, mode: Mode, i: int, size: int, share: float) -> Callable[[float], float]:
    """Decode step latency against the batch: at the SM share (mux), or on the whole mesh but
    a turn every 1/share of the time (temporal)."""
    spec, cost, ctx = p.specs[i], p.cost, p.targets[i].mean_context
    if mode is Mode.MUX:
        return lambda b: cost.decode_latency(spec, size, share, b, ctx)
    return lambda b: cost.decode_latency(spec, size, 1.0, b, ctx) / share


def _shape(p: Problem, mode: Mode, i: int, size: int, share: float) -> _Shape | None:
    """The largest batch (memory, engine limit, TPOT SLO), capacity and prefill costs; None
    where the TTFT or the one-request TPOT misses the SLO."""
    spec, t, cost = p.specs[i], p.targets[i], p.cost
    fixed = cost.fixed_bytes(spec, size, p.engine)
    kv_per_req = p.kv_bytes_per_request(i) / size  # per GPU
    max_batch = min(p.engine.max_batch_size, int((p.usable_memory - fixed) // kv_per_req))
    if max_batch < 1:
        return None
    step = _step(p, mode, i, size, share)
    prefill_sm = 1.0 if mode is Mode.TEMPORAL else p.params.min_prefill_share
    ttft = cost.prefill_latency(spec, size, prefill_sm, 1, t.prompt_len)
    if t.ttft is not None and ttft > t.ttft:
        return None
    if t.tpot is not None:
        tpot = t.tpot
        max_batch = _largest(lambda b: step(b) <= tpot, max_batch)
        if max_batch < 1:
            return None
    capacity = max_batch / (t.decode_steps * step(max_batch))
    # prefill: per request, SM-seconds at full share and HBM-seconds, batched by the budget
    per_job = max(1, min(p.engine.max_batch_size, p.engine.prefill_token_budget // t.prompt_len))
    prefill_s = cost.prefill_latency(spec, size, 1.0, per_job, t.prompt_len) / per_job
    hbm_rate = p.cluster.gpu.hbm_bytes_per_s * p.cluster.cost_model.bandwidth_efficiency
    prefill_hbm = cost.prefill_bytes(spec, size, per_job, t.prompt_len) / hbm_rate / per_job
    return _Shape(max_batch, capacity, ttft, prefill_s, prefill_hbm)


def _largest(ok: Callable[[int], bool], hi: int) -> int:
    """The largest b in [1, hi] with ok(b) (ok monotone: true then false); 0 if none."""
    if not ok(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _batch_at(arrivals_per_step: float, step: Callable[[float], float], max_batch: int) -> float:
    """Mean decode batch b with b = (decode-token rate) × step(b) (Little's law).

    The root of f(b) = rate × step(b) − b, bracketed by f(0) > 0 ≥ f(max_batch) (a candidate
    never serves past its capacity), by false position with the Illinois rule: a handful of
    cost-model calls where bisection to the same precision takes fifty. Returns the bracket's
    upper end (f ≤ 0 there: the batch is never under-estimated).
    """
    lo, hi = 0.0, float(max_batch)
    f_lo, f_hi = arrivals_per_step * step(lo) - lo, arrivals_per_step * step(hi) - hi
    if f_hi >= 0:
        return hi
    side = 0
    for _ in range(100):
        if hi - lo <= 1e-12 * hi or f_hi == 0:
            break
        mid = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        if not lo < mid < hi:
            mid = (lo + hi) / 2
        f_mid = arrivals_per_step * step(mid) - mid
        if f_mid > 0:
            lo, f_lo = mid, f_mid
            if side == -1:  # the same end moved twice: halve the other's weight
                f_hi /= 2
            side = -1
        else:
            hi, f_hi = mid, f_mid
            if side == 1:
                f_lo /= 2
            side = 1
    return max(hi, 1e-9)


def _pareto(cands: list[Candidate]) -> list[Candidate]:
    """Drop candidates another one beats or equals on served rate and on every resource.

    In decreasing order of served rate (ties: least total use first), a candidate can only be
    dominated by one before it, so one pass against those kept is enough (of equal ones, the
    first listed is kept)."""
    order = sorted(range(len(cands)), key=lambda k: (-cands[k].served, sum(cands[k].use), k))
    kept: list[tuple[float, float, float, float]] = []
    out: list[Candidate] = []
    for k in order:
        c = cands[k]
        a, b, d, e = c.use
        if any(u[0] <= a and u[1] <= b and u[2] <= d and u[3] <= e for u in kept):
            continue
        kept.append(c.use)
        out.append(c)
    return out
