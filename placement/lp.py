"""A linear (or mixed-integer) program built a column at a time, solved in place.

Column generation re-solves one master program hundreds of times with a few columns more
each time; HiGHS (`highspy`, the `highs` extra) keeps it in memory and warm-starts the
simplex from the last basis. Without highspy, the same program is handed to CBC through
pulp on every solve: slower, the same answers.

Both maximize. Row duals follow one convention: a column's reduced value is its cost less
Σ dual × coefficient, and a binding `≤` row has a dual ≥ 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pulp

INF = math.inf


def highs_available() -> bool:
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Solution:
    """What a solve found."""

    status: str  # "optimal", "limit" (a feasible incumbent, not proven), "infeasible"
    value: float
    x: list[float]  # per column
    duals: list[float]  # per row (LP only; empty for a MIP)
    bound: float  # the solver's bound on the optimum (LP: the value)

    @property
    def feasible(self) -> bool:
        return self.status != "infeasible"


class Program:
    """Rows and columns with bounds; `solve` as an LP, `solve_mip` with integer columns.

    `solver` picks the LP method: "simplex" (the default: a vertex, warm-started), or "ipm",
    HiGHS's interior point method without crossover (a point inside the optimal face; HiGHS
    only)."""

    def __init__(
        self, backend: str = "auto", threads: int | None = None, solver: str = "simplex"
    ) -> None:
        if solver not in ("simplex", "ipm"):
            raise ValueError(f"unknown LP solver {solver!r} (simplex or ipm)")
        use_highs = backend == "highs" or (backend == "auto" and highs_available())
        if solver == "ipm" and not use_highs:
            raise ValueError("the ipm solver needs HiGHS (highspy), not CBC")
        self._impl: _Highs | _Pulp = _Highs(threads, solver) if use_highs else _Pulp(threads)
        self.num_rows = 0
        self.num_cols = 0

    @property
    def backend(self) -> str:
        return "highs" if isinstance(self._impl, _Highs) else "cbc"

    def add_row(self, lo: float, hi: float) -> int:
        self._impl.add_row(lo, hi)
        self.num_rows += 1
        return self.num_rows - 1

    def add_col(
        self,
        cost: float,
        lo: float,
        hi: float,
        rows: Sequence[int],
        coefs: Sequence[float],
        integer: bool = False,
    ) -> int:
        self._impl.add_col(cost, lo, hi, list(rows), list(coefs), integer)
        self.num_cols += 1
        return self.num_cols - 1

    def set_col_bounds(self, col: int, lo: float, hi: float) -> None:
        self._impl.set_col_bounds(col, lo, hi)

    def set_row_bounds(self, row: int, lo: float, hi: float) -> None:
        self._impl.set_row_bounds(row, lo, hi)

    def solve(self, time_limit: float = INF) -> Solution:
        """The LP relaxation (integrality ignored)."""
        return self._impl.solve(mip=False, time_limit=time_limit)

    def solve_mip(
        self,
        time_limit: float,
        node_limit: int | None = None,
        start: Sequence[float] | None = None,
    ) -> Solution:
        """The mixed-integer program, from a feasible `start` where given."""
        return self._impl.solve(mip=True, time_limit=time_limit, node_limit=node_limit, start=start)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """HiGHS prints a banner to the C-level stdout when the first instance is made."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_BANNER_SHOWN = False


def quiet_highs_banner() -> None:
    """Make the process's first HiGHS instance with stdout silenced (later ones are quiet)."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN or not highs_available():
        return
    import highspy

    try:
        with _quiet_stdout():
            highspy.Highs()
    except OSError:  # no file descriptor 1 to silence: let it print
        pass
    _BANNER_SHOWN = True


class _Highs:
    def __init__(self, threads: int | None, solver: str = "simplex") -> None:
        import highspy

        quiet_highs_banner()
        self._hs = highspy
        self.h = highspy.Highs()
        h = self.h
        h.setOptionValue("output_flag", False)
        h.setOptionValue("random_seed", 0)
        h.setOptionValue("threads", threads or 1)  # deterministic, and one core is ours
        if solver == "ipm":
            h.setOptionValue("solver", "ipm")
            h.setOptionValue("run_crossover", "off")
        h.changeObjectiveSense(highspy.ObjSense.kMaximize)
        self.integer: list[int] = []

    @staticmethod
    def _b(x: float) -> float:
        return x if math.isfinite(x) else (1e30 if x > 0 else -1e30)

    def add_row(self, lo: float, hi: float) -> None:
        self.h.addRow(self._b(lo), self._b(hi), 0, np.array([], np.int32), np.array([], float))

    def add_col(
        self, cost: float, lo: float, hi: float, rows: list[int], coefs: list[float], integer: bool
    ) -> None:
        self.h.addCol(
            cost,
            self._b(lo),
            self._b(hi),
            len(rows),
            np.array(rows, np.int32),
            np.array(coefs, float),
        )
        if integer:
            self.integer.append(self.h.getNumCol() - 1)

    def set_col_bounds(self, col: int, lo: float, hi: float) -> None:
        self.h.changeColBounds(col, self._b(lo), self._b(hi))

    def set_row_bounds(self, row: int, lo: float, hi: float) -> None:
        self.h.changeRowBounds(row, self._b(lo), self._b(hi))

    def _integrality(self, on: bool) -> None:
        if self.integer:
            idx = np.array(self.integer, np.int32)
            kind = np.full(len(idx), 1 if on else 0, np.uint8)
            self.h.changeColsIntegrality(len(idx), idx, kind)

    def solve(
        self,
        mip: bool,
        time_limit: float = INF,
        node_limit: int | None = None,
        start: Sequence[float] | None = None,
    ) -> Solution:
        h, status_t = self.h, self._hs.HighsModelStatus
        h.setOptionValue("time_limit", max(time_limit, 0.01) if math.isfinite(time_limit) else 1e30)
        h.setOptionValue("mip_max_nodes", node_limit if node_limit is not None else 2**31 - 1)
        if mip:
            self._integrality(True)
            if start is not None:
                h.setSolution(
                    len(start), np.arange(len(start), dtype=np.int32), np.array(start, float)
                )
        try:
            h.run()
            model = h.getModelStatus()  # read before the model changes back (that resets it)
            info = h.getInfo()
            sol = h.getSolution()
        finally:
            if mip:
                self._integrality(False)
        if model == status_t.kOptimal:
            status = "optimal"
        elif model in (status_t.kInfeasible, status_t.kUnboundedOrInfeasible):
            status = "infeasible"
        elif mip and info.primal_solution_status == 2:  # a feasible incumbent
            status = "limit"
        else:
            status = "infeasible" if mip else "limit"
        value = float(info.objective_function_value) if status != "infeasible" else -INF
        if mip:
            bound = float(info.mip_dual_bound)
            bound = bound if math.isfinite(bound) and abs(bound) < 1e29 else INF
            return Solution(status, value, list(sol.col_value), [], bound)
        return Solution(status, value, list(sol.col_value), list(sol.row_dual), value)


class _Pulp:
    """Rebuilds a pulp program from the stored rows and columns on every solve (CBC)."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.rows: list[list[float]] = []  # [lo, hi]
        self.cols: list[tuple[float, float, float, list[int], list[float], bool]] = []

    def add_row(self, lo: float, hi: float) -> None:
        self.rows.append([lo, hi])

    def add_col(
        self, cost: float, lo: float, hi: float, rows: list[int], coefs: list[float], integer: bool
    ) -> None:
        self.cols.append((cost, lo, hi, rows, coefs, integer))

    def set_col_bounds(self, col: int, lo: float, hi: float) -> None:
        cost, _, _, rows, coefs, integer = self.cols[col]
        self.cols[col] = (cost, lo, hi, rows, coefs, integer)

    def set_row_bounds(self, row: int, lo: float, hi: float) -> None:
        self.rows[row] = [lo, hi]

    def solve(
        self,
        mip: bool,
        time_limit: float = INF,
        node_limit: int | None = None,
        start: Sequence[float] | None = None,
    ) -> Solution:
        prob = pulp.LpProblem("program", pulp.LpMaximize)
        xs = []
        terms: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in self.rows]
        for j, (_, lo, hi, rows, coefs, integer) in enumerate(self.cols):
            cat = pulp.LpInteger if (mip and integer) else pulp.LpContinuous
            v = pulp.LpVariable(
                f"x{j}", lo if math.isfinite(lo) else None, hi if math.isfinite(hi) else None, cat
            )
            if start is not None:
                v.setInitialValue(start[j])
            xs.append(v)
            for r, a in zip(rows, coefs, strict=True):
                terms[r].append((v, a))
        prob += pulp.LpAffineExpression([(v, c[0]) for v, c in zip(xs, self.cols, strict=True)])
        names = []
        for r, (lo, hi) in enumerate(self.rows):
            expr = pulp.LpAffineExpression(terms[r])
            if math.isfinite(lo) and math.isfinite(hi) and lo == hi:
                prob += expr == lo, f"r{r}"
                names.append([f"r{r}"])
                continue
            here = []
            if math.isfinite(hi):
                prob += expr <= hi, f"r{r}u"
                here.append(f"r{r}u")
            if math.isfinite(lo):
                prob += expr >= lo, f"r{r}l"
                here.append(f"r{r}l")
            names.append(here)
        options = [f"maxNodes {node_limit}"] if (mip and node_limit is not None) else []
        limit = time_limit if math.isfinite(time_limit) else None
        cmd = pulp.PULP_CBC_CMD(
            msg=False,
            timeLimit=limit,
            warmStart=mip and start is not None,
            threads=self.threads,
            options=options,
        )
        prob.solve(cmd)
        if prob.status != pulp.LpStatusOptimal:
            return Solution("infeasible", -INF, [0.0] * len(xs), [], INF)
        x = [float(v.value() or 0.0) for v in xs]
        value = float(pulp.value(prob.objective) or 0.0)
        if mip:
            proven = prob.sol_status == pulp.LpSolutionOptimal
            return Solution(
                "optimal" if proven else "limit", value, x, [], value if proven else INF
            )
        cons = prob.constraints
        duals = [sum(cons[n].pi or 0.0 for n in here) for here in names]
        return Solution("optimal", value, x, duals, value)
