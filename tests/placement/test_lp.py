from __future__ import annotations

import math

import pytest

from placement.lp import Program, highs_available


def small_lp(solver: str) -> Program:
    """max x + y with x + 2y ≤ 4, 3x + y ≤ 6: optimum 2.8 at (1.6, 1.2)."""
    prog = Program("highs", solver=solver)
    a, b = prog.add_row(-math.inf, 4.0), prog.add_row(-math.inf, 6.0)
    prog.add_col(1.0, 0.0, math.inf, [a, b], [1.0, 3.0])
    prog.add_col(1.0, 0.0, math.inf, [a, b], [2.0, 1.0])
    return prog


@pytest.mark.skipif(not highs_available(), reason="needs highspy")
def test_the_interior_point_method_finds_the_simplex_optimum() -> None:
    simplex, ipm = small_lp("simplex").solve(), small_lp("ipm").solve()
    assert simplex.status == ipm.status == "optimal"
    assert simplex.value == pytest.approx(2.8, abs=1e-12)
    assert ipm.value == pytest.approx(2.8, abs=1e-7)
    assert ipm.x == pytest.approx([1.6, 1.2], abs=1e-6)
    assert ipm.duals == pytest.approx(simplex.duals, abs=1e-6)


def test_bad_solvers_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown LP solver 'barrier'"):
        Program(solver="barrier")
    with pytest.raises(ValueError, match="the ipm solver needs HiGHS"):
        Program("cbc", solver="ipm")
