"""The strongest per-size cut at an aggregate LP point: exact separation over its support.

`cut_bound`'s dual-feasible-function cuts see one linear projection of the four resources at a
time. Every valid inequality of the form Σ_c g(c)·x_c ≤ G·(meshes of size s) — what any
per-mesh packing argument gives — is found here instead, for the candidates the LP solution
uses: does x* (restricted to its support S) fit into meshes* meshes of size s *fractionally*?
That is the covering LP  min Σ_C λ_C  s.t.  Σ_{C∋c} λ_C ≥ x*_c (c ∈ S), λ ≥ 0, over the
configurations C of S (subsets that fit one mesh), solved by column
generation with `configurations.price` as the pricer. If its value exceeds meshes*, its dual g
gives a violated cut.

Why every cut is valid. The items are candidates of units (a model's replica); a placement
puts at most one candidate of a unit on a mesh (it places each unit once), and so do the
configurations here: the pricers see item k as a candidate of "model" `units[k]` (one per
model and mesh) and name it by "replica" k. For g ≥ 0 on S (0 elsewhere) let G ≥ max over
configurations C of *all* candidates of size s of Σ_{c∈C∩S} g(c). Configurations are closed
under taking subsets (`candidates.fits` is monotone), so C∩S is itself a configuration of
S, and G is the maximum over configurations of S alone — which the MIP pricer `price_mip`
bounds from above by its solver's dual bound (`Solution.bound`, so HiGHS's relative gap
tolerance is inside it), plus the items worth at most `MIN_VALUE` that it leaves out, added
back whole; its feasibility tolerance only admits more configurations. Two replicas of one
model are two units here, so they may share a configuration where `configurations.price`
(one candidate per model) would not: G is taken over more subsets than placements use,
larger, still valid. Summed over a placement's meshes of size s: Σ_{placed c} g(c) ≤
G·(meshes of size s). Every placement satisfies the row, so the LP with it is still a
relaxation. The cut is scaled so that G = 1.

Measured on 64 models / 64 GPUs (`python scripts/probe_support_cuts.py --rounds 8 --ipm`,
benchmarks/results/placement/support_cuts_probe.json, load 0.9-1.2): the aggregate LP with
the DFF cuts stops at 611.42 with 8.13 meshes of 4 GPUs and 3.94 of 8. Each round the
separation finds violated cuts (1-2, 12-14 CPU-s a round by the simplex, 13-22 by the
interior point method); it stops at the first, so the covering LP is only bracketed: by the
simplex between 8.15-8.18 and 8.31-8.32 meshes of 4 GPUs, 3.96-3.98 and 4.06 of 8 (the cuts
are violated by 0.2-1.2 %). By the simplex the value stays at 611.4225, with the same meshes
per size (to 1e-13), after 8 rounds (78 CPU-s); by the interior point method
(`solver="ipm"`) it falls to 611.398 after 8 (109 CPU-s). Why the cuts barely move the value
(a large optimal face is one guess) was not measured. Clique (conflict) and cardinality cuts
are special cases (g an indicator) and are not violated there at all: the support of 4-GPU
meshes has 17 conflicting pairs (cliques of at most 3 against 8.13 meshes), that of 8-GPU
meshes none; at least 6 resp. 9 support items fit one mesh against the 4.83 resp. 6.28 per
mesh the LP places. So this family is off by default (`cut_bound(support=True)` turns it
on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from placement.candidates import Candidate
from placement.configurations import MIN_VALUE, price, price_mip
from placement.deadline import Deadline
from placement.lp import Program

ITERATIONS = 60  # column-generation iterations per separation at most
SMOOTH = 0.7  # Wentges smoothing: price at 0.7·(best dual so far) + 0.3·(the LP's dual)
KEEP = 10  # configurations added per pricing call at most


@dataclass(frozen=True)
class SupportCut:
    """Σ coefs[n]·x_n over a size's candidates (in the aggregate LP's order) ≤ its meshes."""

    size: int
    coefs: tuple[float, ...]

    def values(self, shares: np.ndarray) -> np.ndarray:
        """The coefficients, one per row of `shares` (the size's candidates)."""
        if len(shares) != len(self.coefs):
            raise ValueError(
                f"a support cut of size {self.size} has {len(self.coefs)} coefficients, "
                f"the size has {len(shares)} candidates"
            )
        return np.array(self.coefs)


@dataclass(frozen=True)
class Separation:
    """What one exact separation found: the cut, if any, and the covering LP's value (the
    meshes the support needs fractionally) between two bounds."""

    g: np.ndarray | None  # per item, Σ_{c∈C} g(c) ≤ 1 for every configuration C; or None
    cover_lower: float  # the covering LP is at least this (Farley's bound, or Σ g·xs)
    cover_upper: float  # and at most this (the LP over the configurations found)


def config_bound(
    items: Sequence[Candidate],
    g: np.ndarray,
    capacity: tuple[float, float, float, float],
    time_limit: float = 10.0,
    units: Sequence[int] | None = None,
    backend: str = "auto",
) -> float:
    """An upper bound on Σ g over any subset of `items` that fits one mesh with at most one
    item of each unit (`units[k]`: item k's unit; default: each item its own); inf if the
    MIP found nothing in time. Items worth at most `MIN_VALUE` are left to the pricer's
    filter and added back whole."""
    units = range(len(items)) if units is None else units
    left_out = float(g[g <= MIN_VALUE].sum())
    fake = _valued(items, units, g)
    if not fake:
        return left_out
    found = price_mip(items[0].size, fake, dict.fromkeys(units, 0.0), capacity, 0.0,
                      time_limit, backend=backend)  # fmt: skip
    return found.upper + left_out


def separate_support(
    items: Sequence[Candidate],
    xs: np.ndarray,
    meshes: float,
    capacity: tuple[float, float, float, float],
    *,
    units: Sequence[int] | None = None,
    deadline: Deadline | None = None,
    backend: str = "auto",
) -> Separation:
    """g ≥ 0 on `items` (the support, with weights `xs`; `units[k]` the unit of item k,
    default each item its own) with Σ_{c∈C} g(c) ≤ 1 for every configuration C (at most one
    item per unit) and Σ g·xs > meshes, if one was found (else the support fits
    fractionally, or the search ran out of iterations or time); and the covering LP's value
    as far as it was found."""
    deadline = deadline or Deadline.never()
    units = list(range(len(items)) if units is None else units)
    if len(units) != len(items):
        raise ValueError(f"{len(items)} support items but {len(units)} units")
    n = len(items)
    zero = dict.fromkeys(units, 0.0)
    prog = Program(backend)
    rows = [prog.add_row(float(v), math.inf) for v in xs]
    seen: set[tuple[int, ...]] = set()

    def add(members: Sequence[int]) -> bool:
        key = tuple(sorted(members))
        if key in seen:
            return False
        seen.add(key)
        prog.add_col(-1.0, 0.0, math.inf, [rows[k] for k in key], [1.0] * len(key))
        return True

    def left() -> float:
        return max(deadline.left(), 0.05)

    for k in range(n):
        add((k,))
    center: np.ndarray | None = None
    best = -math.inf  # Farley's bound Σ g·xs / max g(C) at the center: a lower bound
    upper = math.inf
    need = meshes * (1 + 1e-6) + 1e-9
    for _ in range(ITERATIONS):
        if deadline.passed():
            break
        sol = prog.solve(time_limit=left())
        if sol.status != "optimal":
            break
        upper = -sol.value
        if upper <= need:
            break  # columns found so far already cover xs within the meshes
        pi = np.maximum(-np.array(sol.duals), 0.0)
        g = pi if center is None else SMOOTH * center + (1 - SMOOTH) * pi
        found = price(items[0].size, _valued(items, units, g), zero, capacity, keep=KEEP)
        new = sum(add([c.replica for c in conf.cands]) for _, conf in found.configs)
        if found.exact and found.configs:
            value = float(g @ xs) / found.configs[0][0]
            if value > best:
                center, best = g / found.configs[0][0], value
        if new == 0:  # stalled (or the pricer hit its node limit): ask the MIP at the LP's dual
            top = config_bound(items, pi, capacity, left(), units, backend)
            if float(pi @ xs) / top > best:
                center, best = pi / top, float(pi @ xs) / top
            if best > need:
                break
            mip = price_mip(items[0].size, _valued(items, units, pi), zero, capacity, 0.0,
                            left(), backend=backend)  # fmt: skip
            if not (mip.configs and add([c.replica for c in mip.configs[0][1].cands])):
                break
    lower = max(best, 0.0)
    if center is None or best <= need or upper <= need:
        return Separation(None, lower, upper)
    # the cut's scale comes from the MIP alone, whatever the B&B said
    top = config_bound(items, center, capacity, left(), units, backend)
    if not math.isfinite(top) or float(center @ xs) <= top * need:
        return Separation(None, lower, upper)
    return Separation(center / top, max(lower, float(center @ xs) / top), upper)


def _valued(items: Sequence[Candidate], units: Sequence[int], g: np.ndarray) -> list[Candidate]:
    """The items as candidates worth g: item k as a candidate of its unit ("model"
    `units[k]`, so a configuration holds one item per unit) with "replica" k (so that a
    configuration the pricers find names its items)."""
    return [replace(c, model=units[k], replica=k, served=float(g[k])) for k, c in enumerate(items)
            if g[k] > MIN_VALUE]  # fmt: skip
