"""Branch and price over mesh configurations: a tight bound and a near-optimal plan.

The restricted master program (`master`) picks configurations; its LP, grown by pricing
until no configuration improves it, bounds every placement from above, and the Lagrangian
bound of each pricing round bounds it even before that. The search branches best bound
first, re-pricing at each node: on a fractional number of meshes of a size (at most k, or at
least k + 1), else on a model's fractional presence on meshes of a size (never on that size,
or only on it). The integer master over the configurations found gives the plan.

An `Instance` (`instance`) is what one search places: the whole problem, or (for the local
search and the node-by-node plan) the units of a few nodes on those nodes. Work is bounded
by counts (pricing rounds, search nodes, MIP nodes), so a search that ends before its
deadline is deterministic.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from placement.aggregate import Aggregate, AggregateSolution
from placement.configurations import Config, price, price_bound, price_mip
from placement.cut_bound import start_cuts
from placement.deadline import Deadline
from placement.instance import Instance
from placement.master import MASTER_NODES, Branch, Incumbent, Master, MasterLP, split

MAX_ROUNDS = 200  # pricing rounds per search node
MAX_NODES = 400  # search nodes
# branch-and-bound nodes of one pricing call: past them its columns are a heuristic's, and
# the LP relaxation (or the MIP solver) bounds what is left
PRICING_NODES = 20_000
PRICING_KEEP = 5  # configurations kept per pricing call
ROOT_SHARE = 0.7  # of a search's time left, for pricing at its root
STABILIZE_FROM = 40  # units: from here on, pricing at the root is stabilised


@dataclass
class Search:
    """What branch and price found."""

    best: Incumbent | None
    bound: float | None  # proven upper bound on the total served rate (None: unknown)
    nodes: int
    rounds: int
    converged: bool  # the root LP was solved to optimality (no improving column left)
    # the root's pricing ran to its share of the deadline: the clock may have cut it, so
    # what was found depends on the CPU the run got
    root_cut: bool = False


@dataclass(order=True)
class _Node:
    priority: float  # -bound: the heap pops the best bound first
    order: int  # ties: first pushed first (deterministic)
    branch: Branch = field(compare=False)


class BranchAndPrice:
    """The configuration LP, its pricing, and the search, over one instance."""

    def __init__(
        self,
        instance: Instance,
        *,
        threads: int | None = None,
        progress: Callable[[str], None] | None = None,
        backend: str = "auto",
        label: str = "ilp",
        mip_pricing: bool = False,
        max_nodes: int = MAX_NODES,
        mip_limit_s: float = 10.0,
        max_rounds: int = MAX_ROUNDS,
        pricing_nodes: int = PRICING_NODES,
    ) -> None:
        self.inst = instance
        self.mip_pricing = mip_pricing  # price with the MIP solver alone
        self.max_nodes = max_nodes
        self.mip_limit_s = mip_limit_s  # seconds at most for one pricing MIP (0: none)
        self.max_rounds, self.pricing_nodes = max_rounds, pricing_nodes
        table = instance.table
        self.problem = table.problem
        self.progress, self.label = progress, label
        self.backend = backend
        self.master = Master(instance, threads=threads, backend=backend)
        self.patterns, self.unit_index = self.master.patterns, self.master.unit_index
        self.cap = table.capacity.as_tuple()
        self.model_units = instance.model_units
        self.options = {
            s: [c for i in self.model_units for c in table.options(i, s)] for s in instance.sizes
        }
        self.position = {  # a candidate's index among its (model, size) options
            c: k for i in self.model_units for s in instance.sizes
            for k, c in enumerate(table.options(i, s))
        }  # fmt: skip
        for i, units in self.model_units.items():  # every model alone, at its best that fits
            for s in table.sizes(i):
                alone = next((c for c in table.options(i, s) if table.fits([c])), None)
                if alone is not None:
                    self.add(Config(s, (replace(alone, replica=instance.units[units[0]][1]),)))
        self.rounds = 0
        self._deadline = Deadline.never()

    @property
    def configs(self) -> list[Config]:
        """The master's configurations, in column order."""
        return self.master.configs

    def add(self, cfg: Config) -> bool:
        """Add a configuration to the master; False if it is there already."""
        return self.master.add(cfg)

    # ---- the search ---------------------------------------------------------------------
    def search(self, start: Incumbent | None, *, deadline: Deadline, tolerance: float) -> Search:
        """Best first until every open node is within `tolerance` of the best placement."""
        t0 = time.perf_counter()
        best = start
        for cfg in start.configs if start else []:
            self.add(cfg)

        def value() -> float:
            return -math.inf if best is None else best.value

        def close_enough(bound: float) -> bool:
            return best is not None and bound <= best.value * (1 + tolerance) + 1e-9

        root_branch = Branch()
        root_deadline = deadline.fraction(ROOT_SHARE)  # the rest: the integer master, branching
        root = self._price(root_branch, root_deadline, value() * (1 + tolerance))
        root_cut = root_deadline.passed()
        best = self._better(best, self.master.integer(root_branch, best, deadline))
        if root is None or root.bound == math.inf:
            return Search(best, None, 1, self.rounds, False, root_cut)
        converged = root.converged
        heap = [_Node(-root.bound, 0, root_branch)]
        closed: list[float] = []  # bounds of nodes closed without being solved
        nodes, pushed, last_report = 0, 1, t0
        while heap and not close_enough(-heap[0].priority) and not deadline.passed():
            if nodes >= self.max_nodes:
                break
            node = heapq.heappop(heap)
            lp = (
                root
                if nodes == 0
                else self._price(node.branch, deadline, value() * (1 + tolerance))
            )
            nodes += 1
            if lp is None:
                heapq.heappush(heap, node)
                break
            if close_enough(lp.bound) or (lp.artificial > 1e-6 and lp.converged):
                closed.append(min(lp.bound, -node.priority))  # close enough, or no placement
                continue
            if not lp.converged:  # out of time or rounds: the node stays open
                heapq.heappush(heap, _Node(-min(-node.priority, lp.bound), pushed, node.branch))
                pushed += 1
                if nodes == 1:  # the root did not converge: branching needs its LP
                    break
                continue
            children = split(node.branch, lp, self.inst.sizes, self.inst.caps)
            if not children:  # integral where we branch: the integer master decides
                best = self._better(best, self.master.integer(node.branch, best, deadline))
                closed.append(lp.bound)
                continue
            for child in children:
                heapq.heappush(heap, _Node(-lp.bound, pushed, child))
                pushed += 1
            now = time.perf_counter()
            if self.progress and now - t0 > 2.0 and now - last_report > 2.0:
                last_report = now
                self.progress(
                    f"{self.label}: branch and price, {nodes} nodes, best {value():.2f} req/s, "
                    f"bound {max(-heap[0].priority, *closed, value()):.2f}"
                )
        if nodes > 1:  # the columns found while branching may combine better
            best = self._better(best, self.master.integer(root_branch, best, deadline))
        bound = max([-n.priority for n in heap] + closed + [value()])
        return Search(best, bound, nodes, self.rounds, converged, root_cut)

    @staticmethod
    def _better(a: Incumbent | None, b: Incumbent | None) -> Incumbent | None:
        if b is None:
            return a
        return b if a is None or b.value > a.value + 1e-9 else a

    def best_columns(self, keep: int) -> list[Config]:
        """The `keep` configurations with the largest reduced values at the duals of the
        master LP over the columns so far (its own columns first, ties in column order);
        all of them if the LP has no solution."""
        master = self.master.lp(Branch(), self._deadline)
        if master is None:
            return list(self.configs)
        _, unit_price, weight, size_price = master
        reduced = [
            sum(weight[c.model] * c.served - unit_price[self.unit_index[(c.model, c.replica)]]
                for c in cfg.cands) - size_price[cfg.size]
            for cfg in self.configs
        ]  # fmt: skip
        order = sorted(range(len(self.configs)), key=lambda k: (-reduced[k], k))
        return [self.configs[k] for k in order[:keep]]

    def price_groups(
        self, groups: list[list[int]], keep: int, node_limit: int, deadline: Deadline
    ) -> int | None:
        """One pricing round of the unrestricted master LP, each mesh size priced over each
        group's models alone (a small knapsack, where pricing over every model is not):
        the configurations with a positive reduced value are added; how many (None if the
        LP has no solution or the deadline cut the round)."""
        self._deadline = deadline
        master = self.master.lp(Branch(), self._deadline)
        if master is None:
            return None
        lp, unit_price, weight, size_price = master
        model_price = {i: min(unit_price[k] for k in ks) for i, ks in self.model_units.items()}
        added = 0
        for models in groups:
            chosen = set(models)
            for s in self.inst.sizes:
                if deadline.passed():
                    return None
                options = [c for c in self.options[s] if c.model in chosen]
                threshold = size_price[s] + 1e-7 * max(1.0, lp.value)
                priced = price(s, options, model_price, self.cap, keep, threshold, weight,
                               node_limit=node_limit)  # fmt: skip
                added += sum(self.add(self.to_units(cfg, unit_price)) for _, cfg in priced.configs)
        return added

    def combine(
        self, start: Incumbent | None, deadline: Deadline, node_limit: int = MASTER_NODES
    ) -> Incumbent | None:
        """The best plan the columns so far make together (the integer master, unrestricted,
        from `start` where given); None if they make none."""
        return self.master.integer(Branch(), start, deadline, node_limit)

    # ---- pricing ------------------------------------------------------------------------
    def aggregate(self, deadline: Deadline | None = None) -> AggregateSolution | None:
        """The aggregate LP (`aggregate`) with the fixed cut family (`cut_bound.start_cuts`):
        a bound in a fraction of a second (as tight as the compact program's LP), and its
        duals, a point to steer pricing from."""
        agg = Aggregate(self.inst)
        return agg.solve(start_cuts(self.inst.sizes), self.backend, deadline or self._deadline)

    def _price(self, branch: Branch, deadline: Deadline, stop_at: float) -> MasterLP | None:
        """Column generation at a node, until no column improves the LP (the Lagrangian bound
        meets it), the Lagrangian bound falls to `stop_at`, the round limit, or the deadline;
        None if the LP was never solved.

        At the root, pricing is stabilised (Wentges): it prices at a point between the master's
        duals and the best Lagrangian point so far — first the aggregate LP's duals —, which
        keeps the bound low while the master's duals still swing.
        """
        self._deadline = deadline
        lp: MasterLP | None = None
        bound = math.inf
        center: tuple[list[float], dict[int, float]] | None = None
        alpha = 1.0  # the first round prices at the center itself
        if branch == Branch():
            agg = self.aggregate()
            if agg is not None:
                bound = agg.value
                if len(self.inst.units) >= STABILIZE_FROM:
                    center = (agg.unit_price, agg.weight)
        t0 = last_report = time.perf_counter()
        for rounds in range(self.max_rounds):
            now = time.perf_counter()
            if deadline.passed():
                break
            if self.progress and lp is not None and now - t0 > 2.0 and now - last_report > 2.0:
                last_report = now
                shown = "none yet" if bound == math.inf else f"{bound:.2f}"
                self.progress(
                    f"{self.label}: pricing round {rounds}, LP {lp.value:.2f} req/s, "
                    f"bound {shown}, {len(self.configs)} configurations"
                )
            self.rounds += 1
            master = self.master.lp(branch, self._deadline)
            if master is None:
                if deadline.passed():
                    break
                return MasterLP(-math.inf, {}, {}, 0.0, -math.inf, True)  # no placement here
            lp, out_price, out_weight, size_price = master
            lp.bound = bound
            if center is None:
                sep_price, sep_weight = out_price, out_weight
            else:
                sep_price = [alpha * a + (1 - alpha) * b for a, b in zip(center[0], out_price,
                                                                        strict=True)]  # fmt: skip
                sep_weight = {i: alpha * center[1][i] + (1 - alpha) * out_weight[i]
                              for i in out_weight}  # fmt: skip
            priced = self._price_sizes(branch, deadline, sep_price, sep_weight,
                                       None if center else size_price, lp.value)  # fmt: skip
            if priced is None:
                return lp  # a round cut short bounds nothing
            best_value, configs = priced
            here = self.lagrangian(sep_price, sep_weight, best_value)
            alpha = min(alpha, 0.5)
            if here < bound:
                bound = here
                if center is not None:
                    center = (sep_price, sep_weight)
            added = 0
            tol = 1e-9 * max(1.0, lp.value)
            for cfg in configs:
                cfg = self.to_units(cfg, out_price)
                rc = sum(out_weight[c.model] * c.served - out_price[self.unit_index[(c.model,
                         c.replica)]] for c in cfg.cands) - size_price[cfg.size]  # fmt: skip
                if rc > tol:
                    added += self.add(cfg)
            lp.bound = bound
            if bound <= lp.value + 1e-6 * max(1.0, lp.value) and lp.artificial <= 1e-6:
                lp.bound, lp.converged = min(bound, lp.value), True
                return lp  # the LP is optimal: no configuration improves it
            if not added:
                if center is None:
                    if all(b <= size_price[s] + 1e-6 * max(1.0, lp.value)
                           for s, b in best_value.items()):  # fmt: skip
                        # no configuration improves the LP: its value bounds the node
                        lp.bound, lp.converged = min(bound, lp.value), True
                    return lp  # (or pricing found nothing but could not prove there is nothing)
                alpha /= 2  # mis-priced: step towards the master's duals
                if alpha < 0.05:
                    center = None
                continue
            if lp.artificial <= 1e-6 and bound <= stop_at:
                return lp
        return lp

    def _price_sizes(
        self,
        branch: Branch,
        deadline: Deadline,
        unit_price: list[float],
        weight: Mapping[int, float],
        size_price: dict[int, float] | None,
        scale: float,
    ) -> tuple[dict[int, float], list[Config]] | None:
        """Per mesh size, an upper bound on any configuration's value at these prices and
        the best configurations found; None if the deadline cut the round short."""
        model_price = {i: min(unit_price[k] for k in ks) for i, ks in self.model_units.items()}
        best_value: dict[int, float] = {}
        configs: list[Config] = []
        for s in self.inst.sizes:
            if deadline.passed():
                return None
            if branch.closed(s):
                best_value[s] = 0.0
                continue
            options = [c for c in self.options[s] if (c.model, s) not in branch.forbid]
            threshold = 0.0 if size_price is None else size_price[s] + 1e-7 * max(1.0, scale)
            if self.mip_pricing:
                limit = max(min(self.mip_limit_s, deadline.left()), 0.05)
                priced = price_mip(s, options, model_price, self.cap, threshold, limit, weight)
            else:
                priced = price(
                    s,
                    options,
                    model_price,
                    self.cap,
                    PRICING_KEEP,
                    threshold,
                    weight,
                    node_limit=self.pricing_nodes,
                    deadline=deadline,
                )
            upper = priced.upper
            if (
                not priced.exact
                and self.mip_limit_s > 0
                and not deadline.passed()
                and (not priced.configs or size_price is None)  # columns, or a bound, needed
            ):
                limit = max(min(self.mip_limit_s, deadline.left()), 0.05)
                exact = price_mip(s, options, model_price, self.cap, threshold, limit, weight)
                upper = min(upper, exact.upper)
                configs += [cfg for _, cfg in exact.configs]
            if upper == math.inf or not priced.exact:
                upper = min(upper, price_bound(options, model_price, self.cap, weight))
            best_value[s] = upper  # no configuration of size s is worth more
            configs += [cfg for _, cfg in priced.configs]
        return best_value, configs

    def to_units(self, cfg: Config, unit_price: list[float]) -> Config:
        """A priced configuration's candidates on each model's cheapest unit (replica)."""
        cands = []
        for c in cfg.cands:
            k = min(self.model_units[c.model], key=lambda k: (unit_price[k], k))
            j = self.inst.units[k][1]
            if j != c.replica:
                c = self.inst.table.options(c.model, cfg.size, j)[self.position[c]]
            cands.append(c)
        return Config(cfg.size, tuple(cands))

    def lagrangian(
        self, unit_price: list[float], weight: Mapping[int, float], best_value: dict[int, float]
    ) -> float:
        """Σ unit prices + Σ rate prices × caps + the most any packing of meshes earns at the
        best configurations' values: an upper bound on every placement, whatever the prices."""
        per_node = max(
            sum(p.count(s) * max(best_value[s], 0.0) for s in set(p)) for p in self.patterns
        )
        caps = sum((1.0 - weight[i]) * cap for i, cap in self.inst.caps.items())
        return sum(unit_price) + caps + self.inst.nodes * per_node
