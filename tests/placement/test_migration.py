"""Re-planning against a running placement: move costs, the gain-vs-cost rule, aligning a new
plan with the current one, re-evaluating the current one, and `muxserve plan --current`."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.cli import main
from muxserve.config import load_config
from muxserve.errors import ConfigError
from placement.algorithms import SolveOptions, solve
from placement.candidates import Mode
from placement.migration import (
    Move,
    align,
    choose,
    decide,
    estimate_move_cost_s,
    evaluate,
    locations,
    move_costs,
)
from placement.plan import PlacedMesh, PlacedModel, Placement
from tests.helpers.placement import CONFIGS, cluster, problem, spec


def pm(name: str, served: float, rate: float | None = None) -> PlacedModel:
    return PlacedModel(name, 1, 1.0, 0.5, 0.5, rate or served, served, 1.0, 0.01, 0.01)


def plan(*meshes: tuple[int, list[PlacedModel]]) -> Placement:
    placed = tuple(PlacedMesh(0, (gpu,), tuple(models)) for gpu, models in meshes)
    return Placement("x", Mode.MUX, placed, 0.0, "heuristic")


def test_move_cost_estimate_from_the_weights() -> None:
    s = spec(hidden=512, layers=4)  # fp16
    assert estimate_move_cost_s(s, bytes_per_s=1e9, fixed_s=0.5) == pytest.approx(
        0.5 + s.weight_bytes / 1e9
    )
    assert estimate_move_cost_s(s, tp=2, bytes_per_s=1e9, fixed_s=0.0) == pytest.approx(
        s.weight_bytes / 2e9
    )
    with pytest.raises(ValueError, match="load bandwidth must be positive"):
        estimate_move_cost_s(s, bytes_per_s=0.0)


def test_gain_against_cost_exact() -> None:
    current = plan((0, [pm("a", 3.0), pm("b", 2.0)]), (1, [pm("c", 1.0)]))
    # b moves to GPU 1, where the new plan serves 3 + 1 = 4 req/s: 5 s there cost 20 requests
    new = plan((0, [pm("a", 4.0)]), (1, [pm("b", 3.0), pm("c", 1.0)]))
    costs = {"a": 1.0, "b": 5.0, "c": 2.0}
    d = decide(current, new, costs, horizon_s=10.0)
    assert d.moves == (Move("b", (0, (1,)), 5.0, 20.0),)
    assert (d.gain, d.cost, d.net, d.take) == (2.0, 20.0, 0.0, False)  # 2 x 10 = 20: no gain
    d = decide(current, new, costs, horizon_s=10.5)
    assert (d.net, d.take) == (pytest.approx(1.0), True)
    assert d.reason() == (
        "take the new plan: gain +2.000 req/s x 10.5 s = +21.0 requests, 1 moves cost 20.0 "
        "requests (b -> 0:[1]), net +1.0"
    )
    # a small drift: the gain is small, the move costs the same: nothing moves
    small = plan((0, [pm("a", 3.1)]), (1, [pm("b", 2.0), pm("c", 1.0)]))
    assert decide(current, small, costs, horizon_s=10.0).take is False
    # no move: nothing to take, whatever the numbers say
    assert decide(current, current, costs, 10.0) == decide(current, current, costs, 10.0)
    assert decide(current, current, costs, 10.0).take is False
    with pytest.raises(ValueError, match="horizon must be positive"):
        decide(current, new, costs, 0.0)


def test_align_keeps_models_where_they_are() -> None:
    current = plan((0, [pm("a", 1), pm("c", 1)]), (1, [pm("b", 1)]))
    # the planner put {a, b} on GPU 0 and {c} on GPU 1; the same plan with the GPUs swapped
    # moves only a (to b's GPU) instead of b and c
    new = plan((0, [pm("a", 1), pm("b", 1)]), (1, [pm("c", 1)]))
    aligned = align(new, current)
    assert locations(aligned) == {"a": {(0, (1,))}, "b": {(0, (1,))}, "c": {(0, (0,))}}
    assert [m.model for m in decide(current, aligned, {}, 1.0).moves] == ["a"]


def test_replan_moves_only_when_it_pays() -> None:
    """Three models on two small GPUs: two hot ones cannot share a GPU."""
    specs = [spec(hidden=1024, layers=8) for _ in range(3)]
    cl = cluster(gpus_per_node=2, memory_gib=4.0, peak_tflops=1.0, hbm_gbps=20.0)
    before = problem(specs, [4.0, 4.0, 0.5], cl)
    current = solve(before, ("greedy",), SolveOptions(time_limit=30), progress=None)["greedy"]
    assert locations(current) == {"m0": {(0, (0,))}, "m2": {(0, (0,))}, "m1": {(0, (1,))}}
    kept = evaluate(current, before)
    assert kept.served() == pytest.approx(current.served())  # its own plan, the same numbers
    # m2 turns hot and m1 idle: m0 and m2 on one GPU no longer serve both
    after = problem(specs, [4.0, 0.5, 4.0], cl)
    assert evaluate(current, after).served_total < 8.5 - 1.0
    new = solve(after, ("greedy",), SolveOptions(time_limit=30), progress=None)["greedy"]
    costs = move_costs(after, 2.0)
    chosen, d = choose(new, current, after, costs, horizon_s=60.0)
    assert d.take and [(m.model, m.to) for m in d.moves] == [("m0", (0, (1,)))]
    assert locations(chosen) == {"m0": {(0, (1,))}, "m1": {(0, (1,))}, "m2": {(0, (0,))}}
    assert chosen.notes[-1].startswith("migration: take the new plan: gain +")
    # a move that costs more than the horizon gains: the current placement is kept
    chosen, d = choose(new, current, after, move_costs(after, 1e6), horizon_s=60.0)
    assert not d.take and locations(chosen) == locations(current)
    assert chosen.notes[-1].startswith("migration: keep the current placement: gain +")
    # the same through the planner's options
    opts = SolveOptions(time_limit=30, current=current, move_cost_s=2.0, horizon_s=60.0)
    via = solve(after, ("greedy",), opts, progress=None)["greedy"]
    assert locations(via) == locations(chosen_take(new, current, after))
    with pytest.raises(ConfigError, match="models the workload does not"):
        evaluate(current, problem(specs[:1], [1.0], cl))


def chosen_take(new: Placement, current: Placement, after: object) -> Placement:
    return choose(new, current, after, move_costs(after, 2.0), 60.0)[0]  # type: ignore[arg-type]


def test_plan_cli_with_current(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = [
        *("--models", str(CONFIGS / "models" / "paper-19.yaml")),
        *("--cluster", str(CONFIGS / "clusters" / "paper-4x8-a100-80gb.yaml")),
        "--algorithm",
        "greedy",
    ]
    first = tmp_path / "plan.yaml"
    wl21 = str(CONFIGS / "workloads" / "paper-alpha2.1.yaml")
    wl07 = str(CONFIGS / "workloads" / "paper-alpha0.7.yaml")
    assert main(["plan", *files, "--workload", wl21, "--out", str(first)]) == 0
    capsys.readouterr()
    again = tmp_path / "again.yaml"
    argv = ["plan", *files, "--workload", wl07, "--current", str(first), "--out", str(again)]
    assert main([*argv, "--move-cost", "1e9"]) == 0
    assert "note: migration: keep the current placement: " in capsys.readouterr().out
    old, kept = load_config(first), load_config(again)
    assert old.meshes and kept.meshes
    assert [sorted(m.name for m in x.models) for x in kept.meshes] == [
        sorted(m.name for m in x.models) for x in old.meshes
    ]
    assert main([*argv, "--move-cost", "0"]) == 0
    assert "note: migration: " in capsys.readouterr().out
    assert main([*argv, "--move-cost", "soon"]) == 2
    assert "--move-cost must be 'auto' or non-negative seconds, got 'soon'" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--horizon", "0"]) == 2
    assert "--horizon must be positive" in capsys.readouterr().err
