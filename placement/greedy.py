"""The paper's placement algorithm (MuxServe, Alg. 1) in our form: a fast warm start.

Enumerate mesh groups (how the nodes split into meshes); for each, place models one by one
in decreasing order of rate × compute, each on the mesh where it adds the most estimated
throughput (ties: the smaller mesh, then the least loaded); keep the group with the largest
total. A model's SM share on a mesh size is fixed up front, as in the paper's code: the least
share whose capacity meets its rate, else the share with the largest capacity; where that
share does not fit on a mesh, the best one that fits is tried, so an overloaded cluster
still gets a plan. Replicas (when the table has them) are placed like models, after their
model, each serving at most what the model's rate leaves; one that fits nowhere is dropped.

The groups are not listed one by one. A placement step only depends on the meshes that
already host models and on which mesh sizes still have an empty mesh, so the search follows
one greedy run and branches only where it would open an empty mesh: once with that mesh,
once with no more meshes of that size. Every branch that ends with its meshes packable on
the nodes is the greedy run of the groups it stands for; runs that share a prefix share its
work, and an empty mesh of a size is evaluated once per step, not once per copy. This is
exact (it finds what enumerating every group finds, groups with idle GPUs included) and
independent of the number of nodes, so a 512-node cluster costs what its models cost.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from muxserve.errors import ConfigError
from placement.candidates import Candidate, CandidateTable, Mode, build_candidates
from placement.deadline import Deadline
from placement.mesh_groups import MeshPacker
from placement.plan import Placement, assemble
from placement.problem import Problem

Progress = Callable[[str], None]
_EPS = 1e-9


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def solve_greedy(
    problem: Problem,
    table: CandidateTable | None = None,
    *,
    mode: Mode = Mode.MUX,
    algorithm: str = "greedy",
    progress: Progress | None = stderr_progress,
    progress_after_s: float = 2.0,
    deadline: Deadline | None = None,
) -> Placement:
    """The best greedy placement over all mesh groups (or the best found by `deadline`)."""
    start = time.perf_counter()
    deadline = deadline or Deadline.never()
    table = table or build_candidates(problem, mode, deadline=deadline)
    search = _Search(problem, table, deadline, algorithm, progress, progress_after_s)
    best = search.run()
    if best is None:
        raise ConfigError(
            f"{algorithm}: no mesh group of the cluster can host all {problem.num_models} models "
            f"(weights and KV exceed memory); use a larger cluster or fewer models"
        )
    where = search.packer.place([m.size for m in best.meshes])
    assert where is not None, "a finished branch is always packable"
    meshes = [
        (node, gpus, list(m.hosted)) for (node, gpus), m in zip(where, best.meshes, strict=True)
    ]
    return assemble(
        problem,
        table,
        algorithm,
        meshes,
        solve_time_s=time.perf_counter() - start,
        status="heuristic",
    )


@dataclass
class _Mesh:
    """A mesh that hosts models: its size, resources used per GPU, the paper's load tag."""

    size: int
    used: list[float]
    load: float  # compute placed per GPU (the paper's tie-break: least loaded first)
    opened: int  # the order it was opened in
    hosted: tuple[Candidate, ...] = ()
    # what fits here, per model (and replica): shared by copies until one of them changes
    fit: dict[tuple, Candidate | None] = field(default_factory=dict)

    def copy(self) -> _Mesh:
        return _Mesh(self.size, list(self.used), self.load, self.opened, self.hosted, self.fit)


@dataclass
class _State:
    """One branch of the search: models placed so far and what is left."""

    step: int  # index into the unit order
    meshes: list[_Mesh]
    counts: dict[int, int]  # meshes opened per size
    closed: frozenset[int]  # sizes with no empty mesh left in this branch
    served: dict[int, float] = field(default_factory=dict)  # per model, over its replicas
    total: float = 0.0

    def copy(self) -> _State:
        return _State(
            self.step,
            [m.copy() for m in self.meshes],
            dict(self.counts),
            self.closed,
            dict(self.served),
            self.total,
        )


class _Search:
    """Depth first over the branches of the greedy run; the best finished branch wins."""

    def __init__(
        self,
        problem: Problem,
        table: CandidateTable,
        deadline: Deadline,
        algorithm: str,
        progress: Progress | None,
        progress_after_s: float,
    ) -> None:
        self.problem, self.table, self.deadline = problem, table, deadline
        self.algorithm, self.progress, self.progress_after_s = algorithm, progress, progress_after_s
        cl = problem.cluster
        self.packer = MeshPacker(cl.nodes, cl.gpus_per_node, problem.mesh_sizes)
        self.sizes = self.packer.sizes
        self.cap = table.capacity.as_tuple()

        def key(u: tuple[int, int]) -> tuple:
            i, j = u
            compute = problem.targets[i].rate * problem.specs[i].flops_per_token()
            return (-compute, -problem.specs[i].weight_bytes, i, j)

        self.units = sorted(table.units, key=key)
        self.compute = [
            problem.targets[i].rate * problem.specs[i].flops_per_token()
            for i in range(problem.num_models)
        ]
        self.choices = {(i, s): self._preferred_first(i, s) for i in range(problem.num_models)
                        for s in table.sizes(i)}  # fmt: skip
        most = [
            max((c.served for s in table.sizes(i) for c in table.options(i, s)), default=0.0)
            for i in range(problem.num_models)
        ]
        self.suffix = [0.0] * (len(self.units) + 1)  # the most the units from here can add
        for k in range(len(self.units) - 1, -1, -1):
            i = self.units[k][0]
            self.suffix[k] = self.suffix[k + 1] + min(most[i], problem.targets[i].rate)
        # per resource, the least the mandatory units from here on use (over a whole mesh)
        least = [
            [
                min((c.use[r] * s for s in table.sizes(i) for c in table.options(i, s)), default=0)
                for r in range(4)
            ]
            for i in range(problem.num_models)
        ]
        self.need_suffix = [[0.0] * 4 for _ in range(len(self.units) + 1)]
        for k in range(len(self.units) - 1, -1, -1):
            i, j = self.units[k]
            for r in range(4):
                self.need_suffix[k][r] = self.need_suffix[k + 1][r] + (least[i][r] if j == 0 else 0)
        self.gpus = cl.nodes * cl.gpus_per_node
        self._empty_fit: dict[tuple, Candidate | None] = {}
        self.model_sizes = [table.sizes(i) for i in range(problem.num_models)]
        self.lightest = {  # per (model, size): the least of each resource any choice uses
            k: tuple(min(c.use[r] for c in cs) for r in range(4)) for k, cs in self.choices.items()
        }
        self.best: _State | None = None
        self.branches = 0

    def _preferred_first(self, i: int, size: int) -> list[Candidate]:
        """The paper's share for (model, size) first, then the rest by served rate."""
        opts = list(self.table.options(i, size))
        rate = self.problem.targets[i].rate
        meeting = [c for c in opts if c.served >= rate * (1 - _EPS)]
        first = min(meeting, key=lambda c: c.share) if meeting else opts[0]
        return [first, *[c for c in opts if c is not first]]

    def run(self) -> _State | None:
        start = last_report = time.perf_counter()
        stack = [_State(0, [], {}, frozenset())]
        while stack:
            if self.deadline.passed() and self.best is not None:
                break
            state = stack.pop()
            self.branches += 1
            self._follow(state, stack)
            now = time.perf_counter()
            if self.progress and now - start > self.progress_after_s and now - last_report > 1.0:
                last_report = now
                shown = "none yet" if self.best is None else f"{self.best.total:.2f} req/s"
                self.progress(
                    f"{self.algorithm}: {self.branches} mesh-group branches, "
                    f"{len(stack)} open, best {shown}"
                )
        return self.best

    def _follow(self, state: _State, stack: list[_State]) -> None:
        """Run the greedy from `state` to the end, leaving the other branches on `stack`."""
        while state.step < len(self.units):
            if self.best is not None and state.total + self.suffix[state.step] <= (
                self.best.total + _EPS
            ):
                return  # nothing down this branch can beat the best
            if self.best is not None and self.deadline.passed():
                return
            if self.best is None:  # nothing to return yet: go on until the whole budget is spent
                self.deadline.check(f"{self.algorithm}: placing {len(self.units)} models on meshes")
            i, j = self.units[state.step]
            pick = self._pick(state, i, j)
            if pick is None:
                if j == 0:
                    return  # the model fits nowhere: no group of this branch hosts everyone
                state.step += 1  # a replica that fits nowhere is left out
                continue
            target, c = pick
            if target < 0:  # an empty mesh of size c.size: also try the groups without one
                other = state.copy()
                other.closed = state.closed | {c.size}
                if self._may_finish(other):
                    stack.append(other)
                mesh = _Mesh(c.size, [0.0] * 4, 0.0, len(state.meshes))
                state.meshes.append(mesh)
                state.counts[c.size] = state.counts.get(c.size, 0) + 1
            else:
                mesh = state.meshes[target]
            mesh.hosted = (*mesh.hosted, c)
            mesh.fit = {}
            for r in range(4):
                mesh.used[r] += c.use[r]
            mesh.load += self.compute[i] / mesh.size
            state.served[i] = state.served.get(i, 0.0) + c.served
            state.total += c.served
            state.step += 1
        if not self.packer.completes(state.counts, state.closed):
            return  # these meshes leave GPUs no maximal split would
        if self.best is None or state.total > self.best.total + _EPS:
            self.best = state

    def _may_finish(self, state: _State) -> bool:
        """False where the models left cannot all be placed: one fits only on mesh sizes the
        branch has closed and opened none of, or their memory exceeds what is left."""
        have = {m.size for m in state.meshes}
        seen = set()
        for i, j in self.units[state.step :]:
            if j > 0 or i in seen:
                continue
            seen.add(i)
            if all(s in state.closed and s not in have for s in self.model_sizes[i]):
                return False
        if not self.packer.completes(state.counts, state.closed):
            return False  # no maximal split of the nodes has these meshes
        opened = sum(s * c for s, c in state.counts.items())
        spare = 0 if set(self.sizes) <= state.closed else self.gpus - opened
        for r in range(4):
            room = spare * self.cap[r] + sum(
                (self.cap[r] - m.used[r]) * m.size for m in state.meshes
            )
            if self.need_suffix[state.step][r] > room * (1 + _EPS) + _EPS:
                return False
        return True

    def _pick(self, state: _State, i: int, j: int) -> tuple[int, Candidate] | None:
        """Where unit (i, j) goes: (index of a hosting mesh, or -1 for a new mesh, candidate).

        The most served wins; ties go to the smaller mesh, then to the least loaded (an empty
        mesh first, as the paper's code visits meshes least loaded first).
        """
        left = self.problem.targets[i].rate - state.served.get(i, 0.0)
        if j > 0 and left <= _EPS:
            return None
        best: tuple[float, int, tuple[float, float, int], int, Candidate] | None = None

        def consider(c: Candidate | None, target: int, order: tuple[float, float, int]) -> None:
            nonlocal best
            if c is None:
                return
            if (
                best is None
                or c.served > best[0] + _EPS
                or (
                    c.served >= best[0] - _EPS
                    and (c.size < best[1] or (c.size == best[1] and order < best[2]))
                )
            ):
                best = (c.served, c.size, order, target, c)

        zero = (0.0, 0.0, 0.0, 0.0)
        for s in self.sizes:
            if s in state.closed or (i, s) not in self.choices:
                continue
            if self.packer.fits({**state.counts, s: state.counts.get(s, 0) + 1}):
                consider(self._first_fit(i, j, s, zero, left, None), -1, (0.0, 0.0, -1))
        for k, m in enumerate(state.meshes):
            if j > 0 and any(h.model == i for h in m.hosted):
                continue  # a mesh hosts a model once
            if (i, m.size) in self.choices:
                c = self._first_fit(i, j, m.size, m.used, left, m)
                consider(c, k, (m.load, m.used[0], k))
        if best is None:
            return None
        return best[3], best[4]

    def _first_fit(
        self,
        i: int,
        j: int,
        size: int,
        used: Sequence[float],
        left: float,
        mesh: _Mesh | None,
    ) -> Candidate | None:
        """The first of the model's choices on this mesh that fits (replicas: that serves at
        most what the model's rate leaves). Remembered per mesh until the mesh changes."""
        memo = self._empty_fit if mesh is None else mesh.fit
        key = (i, size) if j == 0 else (i, j, size, round(left, 9))
        if key in memo:
            return memo[key]
        cap = self.cap
        choices = self.choices[(i, size)]
        if j > 0:
            options = self.table.options(i, size, j)
            fitting = [c for c in options if c.served <= left * (1 + _EPS)]
            meeting = [c for c in fitting if c.served >= left * (1 - _EPS)]
            first = min(meeting, key=lambda c: c.share) if meeting else None
            choices = [first, *[c for c in fitting if c is not first]] if first else fitting
        found = None
        u0, u1, u2, u3 = used
        c0, c1, c2, c3 = (x * (1 + _EPS) + _EPS for x in cap)
        lo = self.lightest[(i, size)]
        if u0 + lo[0] > c0 or u1 + lo[1] > c1 or u2 + lo[2] > c2 or u3 + lo[3] > c3:
            choices = []  # not even the lightest choice fits
        for c in choices:
            use = c.use
            if u0 + use[0] <= c0 and u1 + use[1] <= c1 and u2 + use[2] <= c2 and u3 + use[3] <= c3:
                found = c
                break
        memo[key] = found
        return found


def solve_temporal(
    problem: Problem,
    *,
    progress: Progress | None = stderr_progress,
    deadline: Deadline | None = None,
) -> Placement:
    """Temporal multiplexing: models share meshes, one job at a time (the greedy's search)."""
    table = build_candidates(problem, Mode.TEMPORAL, max_replicas=1, deadline=deadline)
    return solve_greedy(problem, table, algorithm="temporal", progress=progress, deadline=deadline)
