"""Mesh configurations: which models (at which candidates) one mesh hosts, and pricing them.

The configuration LP — choose a weight for every feasible mesh configuration so that each
model is placed once and the meshes fit the nodes — is a far tighter relaxation of the
placement program than its compact form. Column generation solves it: the LP over the
configurations found so far gives dual prices, and `price` finds the configuration of a mesh
size with the largest reduced value (a small multi-dimensional knapsack, solved exactly by
branch and bound). When no configuration has a positive reduced value, the LP optimum is an
upper bound on every placement; the best integer choice among the columns is a placement.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from placement.candidates import Candidate, room
from placement.deadline import Deadline
from placement.lp import Program

NODE_LIMIT = 20_000  # branch-and-bound nodes per pricing call before handing over to the MIP
MIN_VALUE = 1e-9  # a candidate worth no more than this is left out of every configuration


@dataclass(frozen=True)
class Config:
    """A mesh of `size` GPUs hosting `cands` (one per model)."""

    size: int
    cands: tuple[Candidate, ...]

    @property
    def served(self) -> float:
        return sum(c.served for c in self.cands)

    @property
    def key(self) -> tuple[int, tuple[tuple[int, int, float, float], ...]]:
        return (
            self.size,
            tuple(sorted((c.model, c.replica, c.share, c.served) for c in self.cands)),
        )


@dataclass(frozen=True)
class Priced:
    """Configurations found by one pricing call; `exact` if the search finished."""

    configs: list[tuple[float, Config]]  # (reduced value, config), best first
    exact: bool
    upper: float  # no configuration is worth more than this


def price(
    size: int,
    options: Sequence[Candidate],
    model_price: Sequence[float] | Mapping[int, float],
    capacity: tuple[float, float, float, float],
    keep: int = 3,
    threshold: float = 0.0,
    weight: Sequence[float] | Mapping[int, float] | None = None,
    node_limit: int = NODE_LIMIT,
    deadline: Deadline | None = None,
) -> Priced:
    """The `keep` best configurations worth more than `threshold`, by Σ (weight × served −
    model price) (weight: 1 less the price of a replicated model's rate, default 1).

    Decides one model at a time (its best candidates first, then leaving it out). A node is
    pruned by the least of three bounds: the sum of the remaining models' best values; the
    Lagrangian bound, with multipliers on the four resources fitted at the root by
    subgradient steps (O(1) per node); and per resource, the LP bound of its multiple-choice
    knapsack (greedy over each model's upper convex hull of value against use).
    """
    by_model: dict[int, list[tuple[float, Candidate]]] = {}
    for c in options:
        v = c.served * (1.0 if weight is None else weight[c.model]) - model_price[c.model]
        if v > MIN_VALUE:
            by_model.setdefault(c.model, []).append((v, c))
    room0 = room(capacity)
    lam = _multipliers(list(by_model.values()), room0, threshold)

    def net(vc: tuple[float, Candidate]) -> float:  # value less the multipliers' charge
        return vc[0] - sum(lam[r] * vc[1].use[r] / room0[r] for r in range(4))

    models = sorted(by_model, key=lambda m: (-max(v for v, _ in by_model[m]), m))
    items = [sorted(by_model[m], key=lambda vc: (-vc[0], vc[1].share)) for m in models]
    suffix = [0.0] * (len(models) + 1)  # Σ of each remaining model's best value
    lsuffix = [0.0] * (len(models) + 1)  # the same, net of the multipliers' charge
    for d in range(len(models) - 1, -1, -1):
        suffix[d] = suffix[d + 1] + max(v for v, _ in items[d])
        lsuffix[d] = lsuffix[d + 1] + max(max(net(vc) for vc in items[d]), 0.0)
    hulls = [_increments(items, r) for r in range(4)]
    best: list[tuple[float, tuple[Candidate, ...]]] = []
    nodes, exact = 0, True

    # what a configuration must beat to be kept: the keep-th best value once there are keep
    # of them (a variable, not a call: the search reads it at every candidate)
    floor = max(threshold, 1e-9)

    def bound(depth: int, used: list[float], need: float) -> float:
        total = min(
            suffix[depth],
            lsuffix[depth] + sum(lam[r] * (1 - used[r] / room0[r]) for r in range(4)),
        )
        if total <= need:
            return total
        for r in range(4):
            free, frac = room0[r] - used[r], 0.0
            for dw, dv, d in hulls[r]:
                if d < depth:
                    continue
                if dw <= free:
                    free -= dw
                    frac += dv
                else:
                    frac += dv * free / dw
                    break
            total = min(total, frac)
        return total

    stop = False
    lam_room = [lam[r] / room0[r] for r in range(4)]
    lam_total = sum(lam)
    r0, r1, r2, r3 = room0
    # per depth: (value, candidate, its four uses, its charge under the multipliers)
    flat = [
        [(v, c, c.use[0], c.use[1], c.use[2], c.use[3],
          sum(lam_room[r] * c.use[r] for r in range(4))) for v, c in its]
        for its in items
    ]  # fmt: skip
    depth_end = len(models)

    def dfs(depth: int, used: list[float], value: float, chosen: list[Candidate]) -> None:
        nonlocal nodes, exact, stop, floor
        nodes += 1
        if nodes % 1024 == 0 and deadline is not None and deadline.passed():
            stop = True
        if nodes > node_limit or stop:
            exact = False
            return
        if depth == depth_end:
            return
        need = floor + 1e-12 - value
        if bound(depth, used, need) <= need:
            return
        u0, u1, u2, u3 = used
        rest, lrest = suffix[depth + 1], lsuffix[depth + 1]
        charge = lam_total - sum(lam_room[r] * used[r] for r in range(4))
        for v, c, a0, a1, a2, a3, ch in flat[depth]:
            if value + v + rest <= floor + 1e-12:
                break  # the rest of this model's candidates are worth less still
            n0, n1, n2, n3 = u0 + a0, u1 + a1, u2 + a2, u3 + a3
            if n0 > r0 or n1 > r1 or n2 > r2 or n3 > r3:
                continue
            if value + v + lrest + charge - ch <= floor + 1e-12 and len(best) >= keep:
                continue  # the Lagrangian bound of the child already falls short
            chosen.append(c)
            if value + v > floor:
                best.append((value + v, tuple(chosen)))
                best.sort(key=lambda b: -b[0])
                del best[keep:]
                if len(best) >= keep:
                    floor = best[-1][0]
            dfs(depth + 1, [n0, n1, n2, n3], value + v, chosen)
            chosen.pop()
        dfs(depth + 1, used, value, chosen)

    dfs(0, [0.0] * 4, 0.0, [])
    configs = [(v, Config(size, cands)) for v, cands in best]
    if exact:
        upper = configs[0][0] if configs else max(threshold, 0.0)
    else:
        upper = bound(0, [0.0] * 4, float("inf"))
    return Priced(configs, exact, upper)


def _multipliers(
    items: list[list[tuple[float, Candidate]]], room: list[float], target: float
) -> list[float]:
    """Multipliers on the (capacity-normalised) resources that make the Lagrangian bound
    Σ_models max(0, max_cand value − λ·use) + Σ λ small, by Polyak subgradient steps
    (vectorised: one pass over every candidate per step)."""
    flat = [(v, c, m) for m, its in enumerate(items) for v, c in its]
    if not flat:
        return [0.0] * 4
    values = np.array([v for v, _, _ in flat])
    uses = np.array([[c.use[r] / room[r] for r in range(4)] for _, c, _ in flat])  # (n, 4)
    owner = np.array([m for _, _, m in flat])
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # items are grouped by model
    lam = np.zeros(4)
    best_lam, best_bound = lam.copy(), np.inf
    theta, stall = 2.0, 0
    for _ in range(60):
        net = values - uses @ lam  # (n,)
        top = np.maximum.reduceat(net, starts)  # per model
        taken = top > 0
        # the first candidate at each model's top (ties: the first, as a scan would)
        first = np.full(len(items), -1)
        hit = np.flatnonzero(net == np.repeat(top, np.diff(np.r_[starts, len(net)])))
        first_hit = np.unique(owner[hit], return_index=True)
        first[first_hit[0]] = hit[first_hit[1]]
        total = float(lam.sum() + top[taken].sum())
        used = uses[first[taken]].sum(axis=0) if taken.any() else np.zeros(4)
        if total < best_bound - 1e-12:
            best_bound, best_lam, stall = total, lam.copy(), 0
        else:
            stall += 1
            if stall >= 5:
                theta, stall = theta / 2, 0
        grad = 1.0 - used  # d bound / d λ
        norm = float(grad @ grad)
        if norm < 1e-18 or theta < 1e-4:
            break
        step = theta * max(total - target, 1e-9) / norm
        lam = np.maximum(0.0, lam - step * grad)
    return [float(x) for x in best_lam]


def _increments(
    items: list[list[tuple[float, Candidate]]], r: int
) -> list[tuple[float, float, int]]:
    """Per model, the upper convex hull of (use of resource r, value) from (0, 0), as
    increments (Δuse, Δvalue, model depth), all models merged by Δvalue / Δuse, best first."""
    out = []
    for d, its in enumerate(items):
        pts = sorted({(c.use[r], v) for v, c in its})
        hull: list[tuple[float, float]] = [(0.0, 0.0)]
        for w, v in pts:
            if v <= hull[-1][1]:
                continue
            while len(hull) >= 2:
                (w1, v1), (w2, v2) = hull[-2], hull[-1]
                if (v2 - v1) * (w - w1) <= (v - v1) * (w2 - w1):  # hull[-1] under the chord
                    hull.pop()
                else:
                    break
            hull.append((w, v))
        for (w1, v1), (w2, v2) in itertools.pairwise(hull):
            out.append((w2 - w1, v2 - v1, d))
    out.sort(key=lambda inc: -inc[1] / inc[0] if inc[0] > 0 else float("-inf"))
    return out


def price_bound(
    options: Sequence[Candidate],
    model_price: Sequence[float] | Mapping[int, float],
    capacity: tuple[float, float, float, float],
    weight: Sequence[float] | Mapping[int, float] | None = None,
) -> float:
    """An upper bound on every configuration's value: the LP relaxation of the pricing
    knapsack (at most one candidate per model, four resources). It exceeds the best value by
    at most the values of four candidates (a basic solution splits at most four models)."""
    prog = Program()
    resource = [prog.add_row(-math.inf, 1.0) for r in range(4)]  # as shares of the capacity
    one: dict[int, int] = {}
    for c in options:
        v = c.served * (1.0 if weight is None else weight[c.model]) - model_price[c.model]
        if v <= MIN_VALUE:
            continue
        if c.model not in one:
            one[c.model] = prog.add_row(-math.inf, 1.0)
        rows = [one[c.model]] + [resource[r] for r in range(4) if c.use[r] > 0]
        coefs = [1.0] + [c.use[r] / capacity[r] for r in range(4) if c.use[r] > 0]
        prog.add_col(v, 0.0, 1.0, rows, coefs)
    if not one:
        return 0.0
    sol = prog.solve()
    return sol.value if sol.feasible else math.inf


def price_mip(
    size: int,
    options: Sequence[Candidate],
    model_price: Sequence[float] | Mapping[int, float],
    capacity: tuple[float, float, float, float],
    threshold: float,
    time_limit: float,
    weight: Sequence[float] | Mapping[int, float] | None = None,
    backend: str = "auto",
) -> Priced:
    """The best configuration by the same value, from a MIP solver (HiGHS where installed,
    else CBC): for when branch and bound stalls. Its upper bound is the solver's own dual
    bound, so it holds at the time limit and within HiGHS's relative gap (1e-4) alike."""
    prog = Program(backend)
    terms: list[tuple[int, float, Candidate]] = []
    by_model: dict[int, list[int]] = {}
    fit = room(capacity)  # as `fits` allows
    resource = [prog.add_row(-math.inf, 1.0) for r in range(4)]  # as shares of the capacity
    for c in options:
        v = c.served * (1.0 if weight is None else weight[c.model]) - model_price[c.model]
        if v > MIN_VALUE:
            by_model.setdefault(c.model, [])
            terms.append((len(terms), v, c))
    if not terms:
        return Priced([], True, 0.0)
    one = {m: prog.add_row(-math.inf, 1.0) for m in by_model}
    for _, v, c in terms:
        rows = [one[c.model]] + [resource[r] for r in range(4) if c.use[r] > 0]
        coefs = [1.0] + [c.use[r] / fit[r] for r in range(4) if c.use[r] > 0]
        prog.add_col(v, 0.0, 1.0, rows, coefs, integer=True)
    sol = prog.solve_mip(time_limit)
    if not sol.feasible:
        return Priced([], False, math.inf)
    exact = sol.status == "optimal"
    chosen = tuple(c for k, _, c in terms if sol.x[k] > 0.5)
    value = sum(v for k, v, _ in terms if sol.x[k] > 0.5)
    upper = max(sol.bound, value, threshold) if exact else max(sol.bound, value)
    if not chosen or value <= threshold:
        return Priced([], exact, upper)
    return Priced([(value, Config(size, chosen))], exact, upper)
