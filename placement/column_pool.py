"""A pool of mesh configurations from many small searches, and the best plan they make together.

At scale the plan is made by small searches: each node's dealt models on that node, pairs of
nodes re-planned. Each prices configurations good for its own few models; a configuration
one search did not use may still be the best for the whole plan. The integer master over
every configuration found so far (the restricted configuration program, solved by the MIP
solver from the best plan as its start) picks the best combination: on the 64-model
instance, 570.5 → 581.1 req/s for the snake deal's columns alone, in a fraction of a second.
The pool's LP is only as good as its meshes, so `grow` adds some: the pool LP's duals price
each mesh size over small groups of models (its own column generation, where pricing over
all 64 models does not finish): on two deals' pool its LP rises 590.97 → 595.3 in two rounds.
Deterministic: configurations are kept in the order they were first found, and the master's
work is bounded by its node limit.
"""

from __future__ import annotations

from collections.abc import Iterable

from placement.candidates import CandidateTable
from placement.column_generation import BranchAndPrice
from placement.configurations import Config
from placement.deadline import Deadline
from placement.instance import Instance
from placement.master import Incumbent

POOL_MASTER_NODES = 1000  # branch-and-bound nodes of the integer master over the pool
# configurations the master chooses from: those of the best reduced value at the pool LP's
# duals. The MIP's time grows fast with its columns (4,288 pooled: 12.7 s for 589.81 req/s;
# the best 600: 5.5 s, the same plan; the best 300: 1.1 s, 589.04)
POOL_MASTER_COLUMNS = 800
# growing the pool: pricing rounds against the pool LP's duals, each over small groups of
# models (B&B nodes per group and mesh size; configurations kept per call)
GROW_ROUNDS = 2
GROW_PRICING = 3000
GROW_KEEP = 5


class ColumnPool:
    """Configurations (mesh columns) found so far, each once, in the order first found."""

    def __init__(self) -> None:
        self._configs: dict[tuple, Config] = {}

    def add(self, configs: Iterable[Config]) -> None:
        for cfg in configs:
            self._configs.setdefault(cfg.key, cfg)

    def __len__(self) -> int:
        return len(self._configs)

    @property
    def configs(self) -> list[Config]:
        """Every configuration kept, in the order first found."""
        return list(self._configs.values())

    # Each step builds its master afresh. Kept and grown column by column instead (measured
    # on 64/64, `bench_placement.py --large-only`, load 1.0-1.7), the pool steps' CPU time
    # outside the integer master fell 0.35 → 0.20 s of ~16.7 s, but the warm-started LP's
    # duals (degenerate) chose other columns: plan 593.1 instead of 594.6 req/s (592.4 with
    # the basis cleared before each step). Not worth a plan that depends on the pool's history.
    def _master(self, table: CandidateTable, threads: int | None, backend: str) -> BranchAndPrice:
        return BranchAndPrice(Instance.whole(table), threads=threads, backend=backend,
                              label="ilp (pool)")  # fmt: skip

    def grow(
        self,
        table: CandidateTable,
        groups: list[list[int]],
        *,
        deadline: Deadline,
        threads: int | None = None,
        backend: str = "auto",
        rounds: int | None = None,
        stats: dict[str, int] | None = None,
    ) -> bool:
        """Column generation for the whole instance over the pool: the pool LP's duals price
        each mesh size over each group of models (`groups`), and what improves the LP joins
        the pool, for `rounds` rounds or until nothing does. The node searches price against
        their own node's duals; these prices are the whole plan's, so the pool's LP (and
        with it the plan) rises where more node searches would not. True if the deadline
        cut it short."""
        bp = self._master(table, threads, backend)
        for cfg in self._configs.values():
            bp.add(cfg)
        cut = False
        for _ in range(GROW_ROUNDS if rounds is None else rounds):
            added = bp.price_groups(groups, GROW_KEEP, GROW_PRICING, deadline)
            if stats is not None:
                stats["pool rounds"] = stats.get("pool rounds", 0) + 1
            if added is None:
                cut = deadline.passed()
                break
            if not added:
                break
        self.add(bp.configs)
        return cut

    def combine(
        self,
        table: CandidateTable,
        start: Incumbent | None,
        *,
        deadline: Deadline,
        threads: int | None = None,
        backend: str = "auto",
        node_limit: int | None = None,
        columns: int | None = None,
    ) -> Incumbent | None:
        """The best whole plan the pool's `columns` most promising configurations make
        (with `start`'s, which are added to the pool; never worse than `start`); None if
        they make none."""
        node_limit = POOL_MASTER_NODES if node_limit is None else node_limit
        columns = POOL_MASTER_COLUMNS if columns is None else columns
        if start is not None:
            self.add(start.configs)

        bp = self._master(table, threads, backend)
        for cfg in self._configs.values():
            bp.add(cfg)
        if len(self._configs) > columns:
            chosen = bp.best_columns(columns) + (start.configs if start is not None else [])
            bp = self._master(table, threads, backend)
            for cfg in chosen:
                bp.add(cfg)
        found = bp.combine(start, deadline, node_limit)
        if found is None or (start is not None and found.value <= start.value + 1e-9):
            return start
        return found
