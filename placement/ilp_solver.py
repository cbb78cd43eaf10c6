"""Running a pulp program: CBC (bundled, the default) or HiGHS (where highspy is installed).

Reports the optimality gap at the end and, for long solves, progress on stderr: CBC writes
its log to a file, which a thread tails.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pulp

from muxserve.errors import ConfigError
from placement.lp import highs_available, quiet_highs_banner

SOLVERS = ("cbc", "highs")

_NODE_LINE = re.compile(
    r"Cbc0010I After (\d+) nodes, (\d+) on tree, (\S+) best solution, best possible (\S+)"
)
_FINAL_OBJ = re.compile(r"^Objective value:\s+(\S+)", re.M)
_FINAL_BOUND = re.compile(r"^(?:Lower|Upper) bound:\s+(\S+)", re.M)


@dataclass(frozen=True)
class SolveResult:
    status: str  # "optimal" or "time limit"
    gap: float | None  # relative gap between the solution and the best bound, when known
    objective: float = 0.0
    bound: float | None = None  # best bound on the objective, when known

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


def run_solver(
    prob: pulp.LpProblem,
    solver: str,
    time_limit: float,
    progress: Callable[[str], None] | None,
    threads: int | None,
    label: str,
    progress_after_s: float = 2.0,
) -> SolveResult:
    """Solve `prob` in place (warm start from the variables' initial values)."""
    if solver == "highs":
        return _run_highs(prob, time_limit, threads)
    if solver != "cbc":
        raise ConfigError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    with tempfile.TemporaryDirectory(prefix="muxserve-ilp-") as tmp:
        log = Path(tmp) / "cbc.log"
        log.touch()
        cmd = pulp.PULP_CBC_CMD(
            msg=False, timeLimit=time_limit, warmStart=True, logPath=str(log), threads=threads
        )
        done = threading.Event()
        watcher = threading.Thread(
            target=_tail, args=(log, done, progress, label, progress_after_s), daemon=True
        )
        watcher.start()
        try:
            prob.solve(cmd)
        finally:
            done.set()
            watcher.join()
        text = log.read_text()
    if prob.status != pulp.LpStatusOptimal:
        status = pulp.LpStatus[prob.status]
        raise RuntimeError(f"{label}: the solver found no feasible plan ({status})")
    optimal = prob.sol_status == pulp.LpSolutionOptimal and "Stopped on" not in text
    return _result(prob, optimal, None if optimal else _cbc_gap(text))


def _result(prob: pulp.LpProblem, optimal: bool, gap: float | None) -> SolveResult:
    obj = float(pulp.value(prob.objective) or 0.0)
    if optimal:
        return SolveResult("optimal", 0.0, obj, obj)
    bound = None if gap is None else obj + gap * max(abs(obj), 1e-9)
    return SolveResult("time limit", gap, obj, bound)


def _cbc_gap(text: str) -> float | None:
    """Gap from CBC's log (objective values there are negated for a maximization)."""
    obj, bound = _FINAL_OBJ.search(text), _FINAL_BOUND.search(text)
    if obj and bound:
        o, b = abs(float(obj.group(1))), abs(float(bound.group(1)))
    else:
        lines = _NODE_LINE.findall(text)
        if not lines:
            return None
        o, b = abs(float(lines[-1][2])), abs(float(lines[-1][3]))
    return abs(b - o) / max(o, 1e-9)


def _tail(
    log: Path,
    done: threading.Event,
    progress: Callable[[str], None] | None,
    label: str,
    after_s: float,
) -> None:
    """Report the latest incumbent and bound every 2 s once the solve has run `after_s`."""
    start = time.perf_counter()
    last = 0.0
    while not done.wait(0.25):
        now = time.perf_counter() - start
        if progress is None or now < after_s or now - last < 2.0:
            continue
        last = now
        lines = _NODE_LINE.findall(log.read_text(errors="replace"))
        if lines:
            nodes, _, best, bound = lines[-1]
            o, b = abs(float(best)), abs(float(bound))
            gap = abs(b - o) / max(o, 1e-9)
            progress(
                f"{label}: {now:.0f} s, {nodes} nodes, best {o:.2f} req/s, "
                f"bound {b:.2f} (gap {gap:.2%})"
            )
        else:
            progress(f"{label}: {now:.0f} s, solving the root relaxation")


def _run_highs(prob: pulp.LpProblem, time_limit: float, threads: int | None) -> SolveResult:
    if not highs_available():
        raise ConfigError("solver 'highs' needs highspy: pip install highspy")
    quiet_highs_banner()
    prob.solve(pulp.HiGHS(msg=False, timeLimit=time_limit, threads=threads))
    if prob.status != pulp.LpStatusOptimal:
        raise RuntimeError(f"HiGHS found no feasible plan ({pulp.LpStatus[prob.status]})")
    gap = None
    model = getattr(prob, "solverModel", None)
    if model is not None:
        gap = float(getattr(model.getInfo(), "mip_gap", float("nan")))
        gap = None if gap != gap else abs(gap)  # NaN: not reported
    return _result(prob, prob.sol_status == pulp.LpSolutionOptimal, gap)
