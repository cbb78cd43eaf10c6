"""scripts/probe_config_lp.py: column generation from the planner's pool on a tiny instance."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.scripts import load_script

TINY = ["--instance", "small", "--models", "5", "--nodes", "2", "--gpus-per-node", "4"]


@pytest.fixture(scope="module")
def probe() -> ModuleType:
    return load_script("probe_config_lp")


def test_grows_the_lp_from_the_pool_between_the_plan_and_the_bounds(
    probe: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "probe"
    res = probe.main([*TINY, "--rounds", "10", "--combine", "5,50", "--out", str(out)])
    assert res["instance"] == "small: 5 models on 2x4 A100-80GB, alpha 0.7, max rate 100.0"
    # 5 models at max rate 100 overfill 8 GPUs: the planner's plan, then the LP from its pool
    assert res["pool"]["plan"] == pytest.approx(69.950065, abs=1e-5)
    assert not res["pool"]["cut"]
    lps = [r["master_lp"] for r in res["rounds"]]
    assert lps[0] == pytest.approx(res["pool"]["plan"], abs=1e-6)  # the pool's LP is its plan
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(lps))  # column generation never loses
    assert [r["added"] for r in res["rounds"]] == [13, 0, 0]
    assert res["stopped"] == "no improving column"
    final = res["final_master_lp"]
    assert final == pytest.approx(69.991088, abs=1e-5)
    assert res["pool"]["plan"] <= final <= res["aggregate_bound"] + 1e-9
    assert res["aggregate_bound"] == pytest.approx(72.978528, abs=1e-5)
    # pricing was exact each round, so every Lagrangian bounds the LP; at the end they meet
    assert all(r["exact"] and r["lagrangian"] >= final - 1e-6 for r in res["rounds"])
    assert res["lagrangian_best_exact"] == pytest.approx(final, abs=1e-6)
    assert (res["bound"], res["bound_from"]) == (res["lagrangian_best"], "Lagrangian")
    # the integer master over the grown columns: never below the planner's plan nor above the LP
    assert [c["columns"] for c in res["combine"]] == [5, 50]
    for c in res["combine"]:
        assert res["pool"]["plan"] - 1e-9 <= c["plan"] <= final + 1e-9
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["rounds"] == res["rounds"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_stops_after_the_rounds_asked(probe: ModuleType, tmp_path: Path) -> None:
    res = probe.main([*TINY, "--rounds", "1", "--out", str(tmp_path / "one")])
    assert [r["round"] for r in res["rounds"]] == [0]
    assert res["stopped"] == "rounds"
    assert res["combine"] == []
    # the last round's columns count in the final LP
    assert res["final_master_lp"] == pytest.approx(69.991088, abs=1e-5)


def test_a_run_without_a_limit_is_refused(
    probe: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as err:
        probe.main([*TINY, "--out", str(tmp_path / "x")])
    assert err.value.code == 2
    assert "--rounds or --cpu-budget" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("bad", ["400,many", "0"])
def test_bad_column_counts_are_refused_by_name(
    probe: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    with pytest.raises(SystemExit) as err:
        probe.main([*TINY, "--rounds", "1", "--combine", bad, "--out", str(tmp_path / "x")])
    assert err.value.code == 2
    assert f"--combine {bad!r}" in capsys.readouterr().err
