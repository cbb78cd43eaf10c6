"""The placement planner as the router's re-planner: fitting a plan onto the fixed meshes, and
proposals on the demo models (a hot pair that cannot share a GPU is split only when it pays)."""

from __future__ import annotations

from pathlib import Path

from muxserve.router.observed import ObservedLoad
from placement.candidates import Mode
from placement.plan import PlacedMesh, PlacedModel, Placement
from placement.replanning import PlacementPlanner, fit_to_meshes, placeable
from tests.router.conftest import LLAMA, MISTRAL, QWEN, tiny_gpu_cluster, two_mesh_config


# ---- fitting a plan onto the fixed meshes -------------------------------------------------------
def pm(name: str) -> PlacedModel:
    return PlacedModel(name, 1, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0, 0.01, 0.01)


def test_fit_to_meshes(demo_models: dict[str, Path], tmp_path: Path) -> None:
    config = two_mesh_config(demo_models, tiny_gpu_cluster(tmp_path / "c.yaml"))
    assert config.meshes is not None
    active = {LLAMA: ("mesh-a",), MISTRAL: ("mesh-a",), QWEN: ("mesh-b",)}
    # the planner split llama from mistral, and put qwen with llama on GPU 0
    plan = Placement(
        "greedy",
        Mode.MUX,
        (
            PlacedMesh(0, (0,), (pm(LLAMA), pm(QWEN))),
            PlacedMesh(0, (1,), (pm(MISTRAL),)),
        ),
        0.0,
        "heuristic",
    )
    answers = fit_to_meshes(plan, config.meshes, active)
    assert len(answers) == 2  # two ways to match two planned meshes to two fixed ones
    for answer in [
        # {llama, qwen} -> mesh-a (no qwen there: it stays), {mistral} -> mesh-b (standby)
        (
            {LLAMA: ("mesh-a",), MISTRAL: ("mesh-b",), QWEN: ("mesh-b",)},
            (
                "qwen-demo: planned on mesh-a, which does not list it (list it there as a standby "
                "model, or set router.replan.add_models, to let it move)",
            ),
        ),
        (
            # {llama, qwen} -> mesh-b (no llama there: it stays), {mistral} -> mesh-a
            {LLAMA: ("mesh-a",), MISTRAL: ("mesh-a",), QWEN: ("mesh-b",)},
            (
                "llama-demo: planned on mesh-b, which does not list it (list it there as a "
                "standby model, or set router.replan.add_models, to let it move)",
            ),
        ),
    ]:
        assert answer in answers


# ---- the placement planner on the demo models ---------------------------------------------------
def loads(rates: dict[str, float]) -> dict[str, ObservedLoad]:
    return {m: ObservedLoad(r, 16.0, 16.0, 10) for m, r in rates.items()}


def test_placement_planner_moves_only_when_it_pays(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    config = two_mesh_config(demo_models, tiny_gpu_cluster(tmp_path / "c.yaml"))
    assert config.router.replan is not None
    planner = PlacementPlanner(config, config.router.replan)
    active = {LLAMA: ("mesh-a",), MISTRAL: ("mesh-a",), QWEN: ("mesh-b",)}
    calm = planner.propose(loads({LLAMA: 1.0, MISTRAL: 0.2, QWEN: 1.0}), active)
    assert calm is not None and not calm.decision.take and calm.decision.moves == ()
    assert calm.target == active
    hot = planner.propose(loads({LLAMA: 4.0, MISTRAL: 4.0, QWEN: 0.1}), active)
    assert hot is not None and hot.decision.take
    assert hot.target == {LLAMA: ("mesh-a",), MISTRAL: ("mesh-b",), QWEN: ("mesh-b",)}
    assert [(m.model, m.to, m.cost_s) for m in hot.decision.moves] == [(MISTRAL, (0, (1,)), 1.0)]
    assert hot.decision.gain > 0.5 and hot.rates[MISTRAL] == 4.0
    # the same drift with a move that costs more than the interval gains: nothing moves
    dear = config.router.replan.model_copy(update={"move_cost_s": 1e6})
    kept = PlacementPlanner(config, dear).propose(
        loads({LLAMA: 4.0, MISTRAL: 4.0, QWEN: 0.1}), active
    )
    assert kept is not None and not kept.decision.take and kept.decision.gain > 0.5


def test_with_add_models_a_model_may_move_to_a_mesh_that_does_not_list_it(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    cluster = tiny_gpu_cluster(tmp_path / "c.yaml")
    fixed = two_mesh_config(demo_models, cluster, standby=False)
    assert fixed.router.replan is not None
    active = {LLAMA: ("mesh-a",), MISTRAL: ("mesh-a",), QWEN: ("mesh-b",)}
    hot = loads({LLAMA: 4.0, MISTRAL: 4.0, QWEN: 0.1})
    kept = PlacementPlanner(fixed, fixed.router.replan).propose(hot, active)
    assert kept is not None and kept.target == active  # mesh-b does not list mistral
    free = two_mesh_config(demo_models, cluster, standby=False, add_models=True)
    assert free.router.replan is not None
    planner = PlacementPlanner(free, free.router.replan)
    assert planner.placeable == {"mesh-a": {LLAMA, MISTRAL, QWEN}, "mesh-b": {LLAMA, MISTRAL, QWEN}}
    moved = planner.propose(hot, active)
    assert moved is not None and moved.decision.take
    # the hot pair split: one of them (here llama, the planner's pick) goes to mesh-b
    assert moved.target == {LLAMA: ("mesh-b",), MISTRAL: ("mesh-a",), QWEN: ("mesh-b",)}
    assert [m.model for m in moved.decision.moves] == [LLAMA]


def test_placeable_keeps_to_a_meshs_weights_budget(demo_models: dict[str, Path], tmp_path: Path):
    config = two_mesh_config(
        demo_models, tiny_gpu_cluster(tmp_path / "c.yaml"), standby=False, add_models=True
    )
    assert config.meshes is not None and config.router.replan is not None
    sizes = {s.name: s.weight_bytes for s in PlacementPlanner(config, config.router.replan).specs}
    assert sizes[MISTRAL] > max(sizes[LLAMA], sizes[QWEN])
    small = config.meshes[1].model_copy(update={"weights_budget_bytes": sizes[MISTRAL] - 1})
    config = config.model_copy(update={"meshes": [config.meshes[0], small]})
    assert placeable(config, PlacementPlanner(config, config.router.replan).specs, True) == {
        "mesh-a": {LLAMA, MISTRAL, QWEN},
        "mesh-b": {LLAMA, QWEN},  # lists qwen; llama fits its budget, mistral does not
    }
    assert placeable(config, (), False) == {"mesh-a": {LLAMA, MISTRAL}, "mesh-b": {QWEN}}
