"""Planner inputs are bounded, and `--time-limit` covers reading them (issue 17)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from muxserve.cli import main
from muxserve.errors import ConfigError
from placement.deadline import Deadline, PlanningTimeout
from placement.gpus import load_cluster
from placement.problem import make_problem
from placement.workload import SLO, Demand, Workload, load_workload
from tests.helpers.placement import CONFIGS, cluster, problem, spec


def write_inputs(tmp: Path, models: int, nodes: int = 2) -> list[str]:
    llama = CONFIGS / "models" / "llama-7b"
    (tmp / "m.yaml").write_text(
        "models:\n" + "".join(f"  - {{name: m{i}, path: {llama}}}\n" for i in range(models))
    )
    (tmp / "w.yaml").write_text(
        "models:\n" + "".join(f"  - {{name: m{i}, rate: 1.0}}\n" for i in range(models))
    )
    (tmp / "c.yaml").write_text(f"gpu: A100-80GB\nnodes: {nodes}\ngpus_per_node: 8\n")
    return ["plan", "--models", str(tmp / "m.yaml"), "--cluster", str(tmp / "c.yaml"),
            "--workload", str(tmp / "w.yaml")]  # fmt: skip


def test_too_many_models_are_refused_before_their_configs_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = write_inputs(tmp_path, 10_000)
    t0 = time.process_time()  # CPU time: what the check saves, whoever else uses the host
    assert main(argv) == 2
    assert time.process_time() - t0 < 10.0  # it ran past 120 s before
    err = capsys.readouterr().err
    assert "w.yaml: models: List should have at most 1024 items" in err


def test_make_problem_refuses_more_models_than_it_plans() -> None:
    s = spec()
    demands = tuple(Demand(f"m{i}", 1.0, 100, 100, SLO(scale=10.0)) for i in range(1025))
    with pytest.raises(ConfigError, match="1025 models to plan; the planner plans at most 1024"):
        make_problem([s] * 1025, Workload(demands), cluster())


def test_a_million_nodes_are_refused_naming_the_key(tmp_path: Path) -> None:
    c = tmp_path / "c.yaml"
    c.write_text("gpu: A100-80GB\nnodes: 1000000\ngpus_per_node: 8\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: nodes: Input should be less than or equal "
                       "to 512"):  # fmt: skip
        load_cluster(c)
    c.write_text("gpu: A100-80GB\nnodes: 8\ngpus_per_node: 64\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: gpus_per_node: Input should be less than"):
        load_cluster(c)


def test_a_workload_past_the_bound_names_the_file(tmp_path: Path) -> None:
    w = tmp_path / "w.yaml"
    w.write_text("models:\n" + "".join(f"  - {{name: m{i}, rate: 1}}\n" for i in range(1025)))
    with pytest.raises(ConfigError, match=r"w\.yaml: models: List should have at most 1024 items"):
        load_workload(w)


def test_the_time_limit_covers_reading_and_building(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """1000 models with a 0.5 s limit: a clear error saying where the time ran out, soon after
    the limit (it ran for minutes before)."""
    argv = write_inputs(tmp_path, 1000, nodes=128)
    t0 = time.perf_counter()
    assert main([*argv, "--time-limit", "0.5"]) == 2
    # generous: a loaded host stretches the work between two deadline checks (the exact
    # overshoot is scripts/bench_placement.py's to measure, not a test's)
    assert time.perf_counter() - t0 < 0.5 + 10.0
    err = capsys.readouterr().err
    assert "muxserve plan: error: the time limit (0.5 s) ran out while " in err
    assert "raise --time-limit, or plan fewer models or a smaller cluster" in err


def test_a_deadline_share_stops_softly_and_the_budget_hard() -> None:
    d = Deadline.after(0.0)
    share = Deadline.after(60.0).fraction(0.0)
    assert share.passed() and share.left() == 0.0
    share.check("anything")  # the whole budget is not spent: no error
    with pytest.raises(PlanningTimeout, match=r"^the time limit \(0 s\) ran out while reading"):
        d.check("reading")
    assert not Deadline.never().passed() and Deadline.never().left() == float("inf")


def test_a_128_model_plan_is_made_within_its_limit() -> None:
    """128 models (of a single architecture) on 32 nodes with 8 s: a plan, in time."""
    from placement.algorithms import SolveOptions, solve

    specs = [spec(hidden=1024, layers=8)] * 128
    p = problem(specs, [float(1 + i % 7) for i in range(128)], cluster(nodes=32, gpus_per_node=4))
    t0 = time.perf_counter()
    plans = solve(p, ("ilp",), SolveOptions(time_limit=8.0), progress=None)
    assert time.perf_counter() - t0 < 8.0 + 10.0  # generous, as above
    assert len({m.name for m in plans["ilp"].models}) == 128
