"""The MuxServe authors' placement algorithm, re-implemented as a baseline (`--algorithm muxserve`).

Our own code, written from what their `PlacementOptimizer.optimize(is_greedy=False)` does
(hao-ai-lab/MuxServe at 2231480, `muxserve/muxsched/placement.py`), with their latency table
replaced by our cost model (on the paper's cluster that is the same measured A100 table):

- **Candidates per mesh size.** From the least mesh a model's weights fit in under their
  memory rule (below) upwards, the decode SM share is the least of 30, 40, …, 90 % whose
  estimated throughput meets the rate (within min(0.5, 10 %)), else the one with the most;
  prefill always runs at 100 %. A model's throughput alone at batch B is
  B / (output tokens × decode step(B) + prefill(B prompts)), B found by bisection up to what
  its share of the KV memory holds — the cluster's average free fraction of a mesh's memory.
- **Their mesh estimator** (`estimate_mesh_throughput`): the mesh's KV memory (98 % of it
  less weights and 6 GiB of activations per model) is split in proportion to rate × KV bytes
  per token; each model starts at the batch that would meet its rate alone, then the least
  served model (by throughput / rate) gets one more batch slot at a time, each model's
  throughput being B / (output tokens × decode step(B) + the prefills of *every* model on
  the mesh) — co-located models slow each other —, and the best rate-weighted mean
  throughput Σ tpt × rate / Σ rate seen on the way is the mesh's score.
- **Mesh memory and SMs**, checked when a model is placed: the mesh's free memory starts at
  0.9 × 60 % of it, a model needs its weights free and takes its weights + 7.6 GB; decode
  shares add up to at most 100 % + an overload of 20 % (no KV is checked).
- **Search.** Every mesh group (a node split per node, combinations with replacement) with a
  mesh large enough for every model and no more meshes than models; models in decreasing
  rate × size factor (1, 2, 4, 8 for ~7B, 13B, 30B, 65B: the parameter count over 6.7 B
  rounded to a power of two), each onto the mesh (least loaded first) whose score it raises
  most (ties: the smaller mesh); the group with the best rate-weighted mean throughput over
  the cluster wins.
- **Their indexing bug** (`fix_index_bug=False`): each mesh's score before the placement is
  looked up by the mesh's position in a list that is re-sorted after every placement, so a
  model is credited against another mesh's score. Fixed by default: the comparison we want
  is with the algorithm the paper describes, and with the bug a plan depends on list order.

The plan it returns is their grouping (which models share which mesh); the shares and
service levels on each mesh are then the best our cost model allows for that grouping
(every model kept), so it is judged and served by the same rules as our plans.
`authors_estimate` is their estimator applied to any placement.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from muxserve.errors import ConfigError
from placement.candidates import Candidate, CandidateTable, Mode, build_candidates
from placement.configurations import price
from placement.deadline import Deadline
from placement.mesh_groups import layout, node_patterns
from placement.plan import Placement, assemble
from placement.problem import Problem

DECODE_SHARES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # their MPS levels below the prefill's 100
PREFILL_SHARE = 1.0
OVERLOAD = 0.2  # decode shares may add up to 1 + this
FREE_FRACTION = 0.9 * (1 - 0.4)  # a mesh's memory free for weights, as their MeshGroup starts
ACTIVATION_BYTES = 6 * 2**30  # per model, in their KV estimate
PLACE_OVERHEAD_BYTES = int(7.6 * 2**30)  # per placed model: activations + two processes
BASE_PARAMS = 6.7e9  # a "7B" model: size factor 1


@dataclass
class _Mesh:
    size: int
    free: float  # bytes
    remaining: float = 1.0  # decode share left (may go down to -OVERLOAD)
    tag: float = 0.0  # -Σ rate × size factor / GPUs of the models on it
    models: list[tuple[int, float]] = field(default_factory=list)  # (model, decode share)


@dataclass(frozen=True)
class AuthorsPlan:
    """The authors' search result: meshes (size, [(model, decode share)]) and their score."""

    pattern: tuple[tuple[int, ...], ...]  # per node, its split into meshes
    meshes: tuple[tuple[int, tuple[tuple[int, float], ...]], ...]  # in pattern order
    score: float  # rate-weighted mean throughput over the cluster (their objective)
    served: dict[int, float]  # their estimate per model, capped at its rate


class Estimator:
    """The authors' throughput estimates, over our cost model (memoized)."""

    def __init__(self, problem: Problem) -> None:
        self.p = problem
        p = problem
        weights = sum(s.weight_bytes for s in p.specs) + ACTIVATION_BYTES * p.num_models
        self.avg_util = weights / (p.cluster.gpu.memory_bytes * p.cluster.num_gpus)
        self.max_batch = p.engine.max_batch_size
        self._decode = lru_cache(maxsize=None)(self._decode_uncached)
        self._prefill = lru_cache(maxsize=None)(self._prefill_uncached)
        self._mesh: dict[tuple, tuple[float, tuple[float, ...]]] = {}

    # ---- latencies --------------------------------------------------------------------
    def _decode_uncached(self, i: int, size: int, share: float, batch: float) -> float:
        p = self.p
        return p.cost.decode_latency(p.specs[i], size, share, batch, p.targets[i].mean_context)

    def _prefill_uncached(self, i: int, size: int, batch: float) -> float:
        p = self.p
        seqs = max(1, round(batch))
        return p.cost.prefill_latency(
            p.specs[i], size, PREFILL_SHARE, seqs, p.targets[i].prompt_len
        )

    def kv_per_seq(self, i: int) -> float:
        t = self.p.targets[i]
        return self.p.specs[i].kv_bytes_per_token * (t.prompt_len + t.output_len)

    def size_factor(self, i: int) -> int:
        ratio = self.p.specs[i].num_params / BASE_PARAMS
        return 2 ** max(0, round(math.log2(max(ratio, 1e-9))))

    def fits_weights(self, i: int, size: int) -> bool:
        p = self.p
        mem = p.cluster.gpu.memory_bytes * size
        return p.specs[i].supports_tp(size) and FREE_FRACTION * mem >= p.specs[i].weight_bytes

    # ---- one model alone ----------------------------------------------------------------
    def alone(
        self, i: int, size: int, share: float, cache: float | None = None
    ) -> tuple[bool, float, int]:
        """(meets its rate, throughput, batch) at this decode share (their
        `estimate_throughput`: bisection on the batch up to what `cache` holds)."""
        t = self.p.targets[i]
        if cache is None:
            cache = self.avg_util * self.p.cluster.gpu.memory_bytes * size
        most = min(cache // self.kv_per_seq(i), self.max_batch)
        lo, hi = 1.0, max(2.0, most)
        tpt, cur = 0.0, lo
        while hi - lo >= 1:
            cur = (lo + hi) / 2
            tpt = cur / (
                self._decode(i, size, share, cur) * t.output_len + self._prefill(i, size, cur)
            )
            if tpt >= t.rate:
                hi = cur
            else:
                lo = cur
        if tpt + min(0.5, tpt * 0.1) > t.rate:
            return True, t.rate, int(cur)
        return False, tpt, int(cur)

    def decode_share(self, i: int, size: int) -> float | None:
        """Their `estimate_mps`: the least share meeting the rate, else the most throughput."""
        best: tuple[float, float] | None = None
        for share in DECODE_SHARES:
            ok, tpt, _ = self.alone(i, size, share)
            if ok:
                return share
            if best is None or tpt > best[0]:
                best = (tpt, share)
        return None if best is None or best[0] <= 0 else best[1]

    # ---- a mesh -------------------------------------------------------------------------
    def mesh(
        self, size: int, models: Sequence[tuple[int, float]]
    ) -> tuple[float, tuple[float, ...]]:
        """(the best rate-weighted mean throughput, each model's throughput there)."""
        key = (size, tuple(sorted(models)))
        if key not in self._mesh:
            self._mesh[key] = self._mesh_uncached(size, list(key[1]))
        score, tpts = self._mesh[key]
        order = sorted(range(len(models)), key=lambda k: models[k])
        out = [0.0] * len(models)
        for pos, k in enumerate(order):
            out[k] = tpts[pos]
        return score, tuple(out)

    def _mesh_uncached(
        self, size: int, models: list[tuple[int, float]]
    ) -> tuple[float, tuple[float, ...]]:
        p = self.p
        rates = [p.targets[i].rate for i, _ in models]
        kv_tok = [p.specs[i].kv_bytes_per_token for i, _ in models]
        weights = sum(p.specs[i].weight_bytes for i, _ in models)
        cache = max(0.0, p.cluster.gpu.memory_bytes * size * 0.98 - weights
                    - ACTIVATION_BYTES * len(models))  # fmt: skip
        base = sum(r * k for r, k in zip(rates, kv_tok, strict=True))
        local = [r * k / base * cache for r, k in zip(rates, kv_tok, strict=True)]
        batch = [float(self.alone(i, size, s, local[k])[2]) for k, (i, s) in enumerate(models)]
        most = [min(local[k] // self.kv_per_seq(i), self.max_batch)
                for k, (i, _) in enumerate(models)]  # fmt: skip
        best, best_tpts = 0.0, tuple(0.0 for _ in models)
        total_rate = sum(rates)
        while any(b < m for b, m in zip(batch, most, strict=True)):
            decode = [self._decode(i, size, s, batch[k]) for k, (i, s) in enumerate(models)]
            prefills = sum(self._prefill(i, size, batch[k]) for k, (i, _) in enumerate(models))
            tpts = [batch[k] / (decode[k] * p.targets[i].output_len + prefills)
                    for k, (i, _) in enumerate(models)]  # fmt: skip
            score = sum(t * r for t, r in zip(tpts, rates, strict=True)) / total_rate
            if score > best:
                best, best_tpts = score, tuple(tpts)
            lagging, ratio = None, math.inf
            for k, (t, r) in enumerate(zip(tpts, rates, strict=True)):
                if t + min(0.5, t * 0.1) < r and batch[k] < most[k] and t / r < ratio:
                    lagging, ratio = k, t / r
            if lagging is None:
                break
            batch[lagging] += 1
        return best, best_tpts


def search(
    problem: Problem, *, fix_index_bug: bool = True, deadline: Deadline | None = None
) -> AuthorsPlan:
    """The authors' search over mesh groups (the best found by `deadline`)."""
    deadline = deadline or Deadline.never()
    est = Estimator(problem)
    p = problem
    sizes = [s for s in (1, 2, 4, 8) if s in p.mesh_sizes]
    share: dict[tuple[int, int], float] = {}
    least: dict[int, int] = {}
    for i in range(p.num_models):
        for s in sizes:
            if est.fits_weights(i, s) and (d := est.decode_share(i, s)) is not None:
                share[(i, s)] = d
                least.setdefault(i, s)
        if i not in least:
            raise ConfigError(f"muxserve: {p.specs[i].name} fits on no mesh by the authors' rules")
    need = max(least.values())
    order = sorted(
        range(p.num_models),
        key=lambda i: (p.targets[i].rate * est.size_factor(i), est.size_factor(i)),
        reverse=True,
    )  # (Python's sort is stable: ties keep the models file's order)
    patterns = node_patterns(p.cluster.gpus_per_node, sizes)
    best: AuthorsPlan | None = None
    for combo in itertools.combinations_with_replacement(patterns, p.cluster.nodes):
        if deadline.passed() and best is not None:
            break
        mesh_sizes = [s for pattern in combo for s in pattern]
        if max(mesh_sizes) < need or len(mesh_sizes) > p.num_models:
            continue
        placed = _place(est, share, order, mesh_sizes, fix_index_bug)
        if placed is None:
            continue
        total_rate = p.total_rate
        score, served = 0.0, {}
        for m in placed:
            if not m.models:
                continue
            mesh_score, tpts = est.mesh(m.size, m.models)
            score += mesh_score * sum(p.targets[i].rate for i, _ in m.models) / total_rate
            for (i, _), t in zip(m.models, tpts, strict=True):
                served[i] = min(t, p.targets[i].rate)
        if best is None or score > best.score:
            meshes = tuple((m.size, tuple(m.models)) for m in placed)
            best = AuthorsPlan(tuple(combo), meshes, score, served)
    if best is None:
        raise ConfigError(
            f"muxserve: no mesh group of the cluster holds all {p.num_models} models by the "
            "authors' rules"
        )
    return best


def _place(
    est: Estimator,
    share: dict[tuple[int, int], float],
    order: list[int],
    mesh_sizes: list[int],
    fix_index_bug: bool,
) -> list[_Mesh] | None:
    """Their `smart_placement` on one mesh group; None where a model fits on no mesh."""
    p = est.p
    meshes = [_Mesh(s, FREE_FRACTION * p.cluster.gpu.memory_bytes * s) for s in mesh_sizes]
    listed = sorted(meshes, key=lambda m: (m.tag, m.free), reverse=True)
    score_by_mesh = {id(m): 0.0 for m in meshes}  # fixed: each mesh's own score
    score_by_pos = [0.0] * len(meshes)  # the bug: by position in the re-sorted list
    for i in order:
        best_pos, best_gain = -1, -100.0
        for pos, m in enumerate(listed):
            d = share.get((i, m.size), 0.0)
            if d <= 0 or m.free < p.specs[i].weight_bytes or m.remaining + OVERLOAD < d - 1e-9:
                continue
            score, _ = est.mesh(m.size, [*m.models, (i, d)])
            before = score_by_mesh[id(m)] if fix_index_bug else score_by_pos[pos]
            gain = score - before
            if gain > best_gain:
                best_pos, best_gain = pos, gain
            elif gain == best_gain:
                ref = listed[best_pos] if fix_index_bug else meshes[best_pos]
                if m.size < ref.size:
                    best_pos = pos
        if best_pos < 0:
            return None
        m = listed[best_pos]
        d = share[(i, m.size)]
        m.tag -= p.targets[i].rate * est.size_factor(i) / m.size
        m.models.append((i, d))
        m.free -= p.specs[i].weight_bytes + PLACE_OVERHEAD_BYTES
        m.remaining -= d
        score_by_mesh[id(m)] += best_gain
        score_by_pos[best_pos] += best_gain
        listed.sort(key=lambda m: (m.tag, m.free), reverse=True)
    return meshes


def solve_muxserve(
    problem: Problem,
    table: CandidateTable | None = None,
    *,
    fix_index_bug: bool = True,
    deadline: Deadline | None = None,
) -> Placement:
    """The authors' grouping, with the shares our cost model finds best for it."""
    start = time.perf_counter()
    deadline = deadline or Deadline.never()
    table = table or build_candidates(problem, Mode.MUX, max_replicas=1, deadline=deadline)
    found = search(problem, fix_index_bug=fix_index_bug, deadline=deadline)
    meshes: list[tuple[int, tuple[int, ...], list[Candidate]]] = []
    notes = [
        f"{OWN_NOTE}{sum(found.served.values()):.4f} req/s "
        f"(rate-weighted mean throughput {found.score:.3f})",
        "index bug " + ("fixed" if fix_index_bug else "kept (as in their code)"),
    ]
    k = 0
    for node, pattern in enumerate(found.pattern):
        for gpus in layout(pattern):
            size, models = found.meshes[k]
            k += 1
            if not models:
                continue
            cands = best_for(table, size, [i for i, _ in models])
            if cands is None:
                names = ", ".join(problem.specs[i].name for i, _ in models)
                raise ConfigError(
                    f"muxserve: our cost model fits no shares for {names} together on "
                    f"{size} GPUs (the authors' rules check no KV memory)"
                )
            meshes.append((node, gpus, cands))
    return assemble(
        problem,
        table,
        "muxserve",
        meshes,
        solve_time_s=time.perf_counter() - start,
        status="heuristic",
        notes=tuple(notes),
    )


def best_for(table: CandidateTable, size: int, models: Sequence[int]) -> list[Candidate] | None:
    """The candidates (one per model, all kept) that serve the most together on one mesh."""
    options = [c for i in models for c in table.options(i, size)]
    keep_all = 1e6 * (table.problem.total_rate + 1.0)  # a model left out costs more than any rate
    found = price(
        size,
        options,
        dict.fromkeys(models, -keep_all),
        table.capacity.as_tuple(),
        keep=1,
        node_limit=1_000_000,
    )
    if not found.configs:
        return None
    cands = list(found.configs[0][1].cands)
    return cands if len(cands) == len(models) else None


OWN_NOTE = "the authors' estimator: "


def own_estimate(plan: Placement) -> float | None:
    """The authors' estimate of their own plan (with their shares), as `solve_muxserve`
    noted it; None for another algorithm's plan."""
    for note in plan.notes:
        if note.startswith(OWN_NOTE):
            return float(note[len(OWN_NOTE) :].split()[0])
    return None


def authors_estimate(problem: Problem, plan: Placement) -> float:
    """Their estimator on any placement: Σ over models of min(rate, the throughput their
    mesh estimator gives it with the plan's decode shares)."""
    est = Estimator(problem)
    total = 0.0
    for mesh in plan.meshes:
        models = [(problem.index(m.name), m.decode_share) for m in mesh.models]
        _, tpts = est.mesh(mesh.size, models)
        total += sum(
            min(t, problem.targets[i].rate) for (i, _), t in zip(models, tpts, strict=True)
        )
    return total
