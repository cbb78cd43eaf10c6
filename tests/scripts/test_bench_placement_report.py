"""scripts/bench_placement_report.py: which estimator the simulation sides with, by hand."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def report() -> ModuleType:
    return load_script("bench_placement_report")


def row(**plans: tuple[float, float, float, float]) -> dict:
    """(ours, theirs, simulated, simulated without contention) per plan."""
    keys = ("estimated", "authors_est", "simulated", "simulated_none")
    return {"scale": 1.0, "alpha": 0.9} | {
        n: dict(zip(keys, v, strict=True)) for n, v in plans.items()
    }


def test_sides_with_the_estimator_that_orders_plans_as_simulated(report: ModuleType) -> None:
    # theirs ranks spatial first; the simulation (and ours) rank it last
    r = row(
        ilp=(200.0, 150.0, 180.0, 182.0),
        greedy=(200.0, 150.0, 180.0, 182.0),  # the same plan: no pair with ilp
        muxserve=(190.0, 160.0, 170.0, 171.0),
        spatial=(150.0, 170.0, 140.0, 140.0),
    )
    s = report.sides_with(r)
    assert s["pairs"] == 5  # ilp-greedy is a tie
    assert s["agree"] == {"ours": 5, "theirs": 0}
    assert (s["sides_with"], s["by"]) == ("ours", "order")
    ours = [math.log(200 / 150 / (180 / 140))] * 2 + [math.log(190 / 150 / (170 / 140))]
    assert s["distance"]["ours"] == pytest.approx(sum(abs(d) for d in ours) / 3, rel=1e-12)


def test_a_tie_in_order_goes_by_distance(report: ModuleType) -> None:
    r = row(
        ilp=(160.6, 148.5, 139.4, 140.7),
        greedy=(160.6, 148.5, 139.4, 140.7),
        muxserve=(151.5, 147.0, 132.0, 133.0),
        spatial=(128.7, 141.9, 124.2, 124.2),
    )
    s = report.sides_with(r)
    assert s["agree"] == {"ours": 5, "theirs": 5}
    assert (s["sides_with"], s["by"]) == ("theirs", "distance")
    assert s["distance"]["theirs"] < s["distance"]["ours"]
    table = "\n".join(report.interference({"paper": [r]}))
    assert "| 40 | 0.9 | 1.25 / 1.05 / 1.12 / 1.13 |" in table
    assert "| 5/5 / 5/5 |" in table and "theirs (by distance) |" in table


def test_no_simulation_no_verdict(report: ModuleType) -> None:
    r = {
        n: {"estimated": 1.0, "authors_est": 1.0} for n in ("ilp", "greedy", "muxserve", "spatial")
    }
    assert report.sides_with(r) == {}
    assert report.interference({"paper": [r]}) == []


def test_large_only_runs_get_their_own_plot_and_table(report: ModuleType, tmp_path: Path) -> None:
    run = {"estimated": 594.6, "bound": 611.4, "gap": 0.0283, "greedy": 390.2}
    run |= {"solve_s": 31.2, "wall_s": 31.3, "cpu_s": 31.2, "status": "gap left", "notes": []}
    run |= {"load_before": 0.7, "load_after": 0.8}
    large = {"models": 64, "gpus": 64, "alpha": 0.7, "max_rate": 100.0, "requested": 885.6}
    large |= {"time_limit_s": 60.0, "runs": [run, run], "spread": 0.0, "same_plan": True}
    result = {"large": large | {"median": 594.6}}
    png = tmp_path / "large.png"
    report.plot_large(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.markdown(result)
    assert "| 2 | 594.6 | 611.4 | 2.83% | 31.3 | 31.2 | 0.7-0.8 | 390.2 |" in table
