"""The strongest per-size cut at an aggregate LP point: exact separation over its support.

`cut_bound`'s dual-feasible-function cuts see one linear projection of the four resources at a
time. Every valid inequality of the form Σ_c g(c)·x_c ≤ G·(meshes of size s) — what any
per-mesh packing argument gives — is found here instead, for the candidates the LP solution
uses: does x* (restricted to its support S) fit into meshes* meshes of size s *fractionally*?
That is the covering LP  min Σ_C λ_C  s.t.  Σ_{C∋c} λ_C ≥ x*_c (c ∈ S), λ ≥ 0, over the
configurations C of S (subsets that fit one mesh), solved by column
generation with `configurations.price` as the pricer. If its value exceeds meshes*, its dual g
gives a violated cut.

Why every cut is valid. For g ≥ 0 on S (0 elsewhere) let G ≥ max over configurations C of
*all* candidates of size s of Σ_{c∈C∩S} g(c). Configurations are closed under taking subsets
(`candidates.fits` is monotone), so C∩S is itself a configuration of S, and G is the maximum
over configurations of S alone — which the MIP pricer `price_mip` bounds from above (its own
dual bound, times 1 + `MIP_GAP` for the solver's relative gap tolerance; its feasibility
tolerance only admits more configurations). Two candidates of one unit count as two items
here, so G is taken over more subsets than placements use: larger, still valid. Summed over
a placement's meshes of size s: Σ_{placed c} g(c) ≤ G·(meshes of size s). Every placement
satisfies the row, so the LP with it is still a relaxation. The cut is scaled so that G = 1.

Measured on 64 models / 64 GPUs (`python scripts/probe_support_cuts.py --rounds 8 --ipm`, and
`--rounds 25`; benchmarks/results/placement/support_cuts_probe*.json): the aggregate LP with
the DFF cuts stops at 611.42 with 8.13 meshes of 4 GPUs and 3.94 of 8, whose supports need
8.35 and 4.09 meshes fractionally, so violated cuts are found every round (1-2 a round, 10-17
CPU-s a round) — yet the value stays at 611.42 after 25 rounds (306 CPU-s) by the simplex,
and reaches 611.41 after 8 (105 CPU-s) by the interior point method: each cut moves the LP to
another point of a large optimal face. Clique (conflict) and cardinality cuts are special
cases (g an indicator) and are not violated there at all: the support of 4-GPU meshes has 17
conflicting pairs (cliques of at most 3 against 8.13 meshes), that of 8-GPU meshes none; at
least 6 resp. 9 support items fit one mesh against the 4.83 resp. 6.28 per mesh the LP
places. So this family is off by default (`cut_bound(support=True)` turns it on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from placement.candidates import Candidate
from placement.configurations import price, price_mip
from placement.deadline import Deadline
from placement.lp import Program

MIP_GAP = 2e-4  # HiGHS stops at a relative gap of 1e-4: scale its "optimal" value past that
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


def config_bound(
    items: Sequence[Candidate],
    g: np.ndarray,
    capacity: tuple[float, float, float, float],
    time_limit: float = 10.0,
) -> float:
    """An upper bound on Σ g over any subset of `items` that fits one mesh (inf if the MIP
    found nothing in time)."""
    fake = _valued(items, g)
    if not fake:
        return 0.0
    found = price_mip(items[0].size, fake, [0.0] * len(items), capacity, 0.0, time_limit)
    return found.upper * (1 + MIP_GAP)


def separate_support(
    items: Sequence[Candidate],
    xs: np.ndarray,
    meshes: float,
    capacity: tuple[float, float, float, float],
    *,
    deadline: Deadline | None = None,
    iterations: int = ITERATIONS,
) -> np.ndarray | None:
    """g ≥ 0 on `items` (the support, with weights `xs`) with Σ_{c∈C} g(c)
    ≤ 1 for every configuration C and Σ g·xs > meshes, or None if none was found (the
    support fits fractionally, or the search ran out of iterations or time)."""
    deadline = deadline or Deadline.never()
    n = len(items)
    zero = [0.0] * n
    prog = Program()
    rows = [prog.add_row(float(v), math.inf) for v in xs]
    seen: set[tuple[int, ...]] = set()

    def add(members: Sequence[int]) -> bool:
        key = tuple(sorted(members))
        if key in seen:
            return False
        seen.add(key)
        prog.add_col(-1.0, 0.0, math.inf, [rows[k] for k in key], [1.0] * len(key))
        return True

    for k in range(n):
        add((k,))
    center: np.ndarray | None = None
    best = -math.inf  # Farley's bound Σ g·xs / max g(C) at the center: a lower bound
    need = meshes * (1 + 1e-6) + 1e-9
    for _ in range(iterations):
        if deadline.passed():
            break
        sol = prog.solve(time_limit=max(deadline.left(), 0.05))
        if sol.status != "optimal" or -sol.value <= need:
            return None  # columns found so far already cover xs within the meshes
        pi = np.maximum(-np.array(sol.duals), 0.0)
        g = pi if center is None else SMOOTH * center + (1 - SMOOTH) * pi
        found = price(items[0].size, _valued(items, g), zero, capacity, keep=KEEP)
        new = sum(add([c.model for c in conf.cands]) for _, conf in found.configs)
        if found.exact and found.configs:
            value = float(g @ xs) / found.configs[0][0]
            if value > best:
                center, best = g / found.configs[0][0], value
        if new == 0:  # stalled (or the pricer hit its node limit): ask the MIP at the LP's dual
            top = config_bound(items, pi, capacity, max(deadline.left(), 0.05))
            if float(pi @ xs) / top > best:
                center, best = pi / top, float(pi @ xs) / top
            if best > need:
                break
            mip = price_mip(items[0].size, _valued(items, pi), zero, capacity,
                            0.0, max(deadline.left(), 0.05))  # fmt: skip
            if not (mip.configs and add([c.model for c in mip.configs[0][1].cands])):
                break
    if center is None or best <= need:
        return None
    # the cut's scale comes from the MIP alone, whatever the B&B said
    top = config_bound(items, center, capacity, max(deadline.left(), 0.05))
    if not math.isfinite(top) or float(center @ xs) <= top * need:
        return None
    return center / top


def _valued(items: Sequence[Candidate], g: np.ndarray) -> list[Candidate]:
    """The items as candidates worth g, item k as "model" k, so that a configuration the
    pricers find names its items."""
    return [replace(c, model=k, replica=0, served=float(g[k])) for k, c in enumerate(items)
            if g[k] > 1e-12]  # fmt: skip
