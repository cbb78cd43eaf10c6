"""Meshes that change shape: a re-plan moves a model to a mesh that does not list it.

Two CPU meshes (child processes): mesh-a serves llama and mistral, mesh-b serves qwen only (no
standby), and `router.replan.add_models` is on. A client sends llama and mistral at about
4 req/s each over HTTP; the planner splits the hot pair, moving one of them (its pick, by
the rates it saw) to mesh-b: the router adds it there (AddModel: loaded asleep, then woken),
switches new requests, drains mesh-a and removes it there. No request fails and the greedy
text is the same on either mesh. Then bad input: adding a model a mesh serves already, or
one over its weights budget, is refused and leaves the mesh as it was; a model active on a
mesh is not removed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.client.protocol import ModelState
from muxserve.config import parse_config
from muxserve.errors import ModelDoesNotFitError
from muxserve.router.local import LocalLauncher
from muxserve.router.router import Router
from muxserve.server.app import create_app
from muxserve.server.background import BackgroundServer
from placement.replanning import PlacementPlanner
from tests.router.conftest import LLAMA, MISTRAL, QWEN, tiny_gpu_cluster, two_mesh_config
from tests.router.test_replan_local import TOKENS, check_all_served, complete, stream_until_moved
from tests.router.test_router_local import wait_for


def test_a_model_moves_to_a_mesh_that_did_not_list_it_without_a_failed_request(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    config = two_mesh_config(
        demo_models,
        tiny_gpu_cluster(tmp_path / "cluster.yaml"),
        standby=False,
        add_models=True,
        window_s=4.0,
        interval_s=600.0,  # only drift re-plans here
        drift=0.5,
        rate_floor=0.5,
        check_s=0.25,
        time_limit_s=10.0,
    )
    assert config.router.replan is not None
    router = Router(config, LocalLauncher(), planner=PlacementPlanner(config, config.router.replan))
    replanner = router.replanner
    assert replanner is not None
    server = BackgroundServer(create_app(router))
    server.start()  # returns once both meshes serve
    a, b = router.meshes["mesh-a"].client, router.meshes["mesh-b"].client
    try:
        assert set(b.model_states()) == {QWEN}
        check_all_served(stream_until_moved(int(server.port), replanner))
        moves = [mv for c in replanner.history for mv in c.moves]
        assert len(moves) == 1, replanner.history
        moved, stays = moves[0][0], ({LLAMA, MISTRAL} - {moves[0][0]}).pop()
        assert moves == [(moved, "mesh-a", "mesh-b")]  # one of the hot pair: the planner's pick
        assert [c.failed for c in replanner.history if c.failed] == []
        assert router.routing.assignment() == {
            moved: ("mesh-b",),
            stays: ("mesh-a",),
            QWEN: ("mesh-b",),
        }
        wait_for(f"{moved} removed from mesh-a", lambda: moved not in a.model_states(), 30)
        assert router.routing.listed(moved) == ["mesh-b"]
        assert a.info is not None and set(a.info.models) == {stays}
        assert b.info is not None and set(b.info.models) == {QWEN, moved}
        assert b.model_states()[moved] is ModelState.AWAKE
        assert router.routing.inflight() == {}

        # ---- bad input: the meshes stay as they were
        with pytest.raises(ValueError, match="served here already"):
            server.run(router.add_model(moved, "mesh-b"), 120)
        with pytest.raises(ValueError, match="active on mesh-b"):
            server.run(router.remove_model(moved, "mesh-b"), 120)
        assert set(b.model_states()) == {QWEN, moved}
    finally:
        server.stop()
    assert all(p.pid is None for p in (router.meshes[m].process for m in ("mesh-a", "mesh-b")))


def test_adding_a_model_over_a_meshs_budget_is_refused_and_changes_nothing(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    config = two_mesh_config(demo_models, tiny_gpu_cluster(tmp_path / "c.yaml"), standby=False)
    assert config.meshes is not None
    config = config.model_copy(update={"router": config.router.model_copy(update={"replan": None})})
    small = config.meshes[1].model_copy(update={"weights_budget_bytes": 4 << 20})
    config = config.model_copy(update={"meshes": [config.meshes[0], small]})
    router = Router(config, LocalLauncher())
    server = BackgroundServer(create_app(router))
    server.start()
    b = router.meshes["mesh-b"].client
    try:
        with pytest.raises(ModelDoesNotFitError, match="'mistral-demo' does not fit") as e:
            server.run(router.add_model(MISTRAL, "mesh-b"), 120)  # 6.8 MiB > 4 MiB
        assert e.value.free_bytes == 4 << 20
        assert set(b.model_states()) == {QWEN}
        assert router.routing.listed(MISTRAL) == ["mesh-a"]
    finally:
        server.stop()


def test_a_model_moves_to_an_mps_mesh_that_did_not_list_it_and_back(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    """The same move between meshes whose engines run pooled mps workers (issue 15): mistral
    joins mesh-b's running pooled workers, serves the same greedy text there, and moving it
    back takes it off mesh-b (it was added there) while mesh-a wakes it again."""
    raw = two_mesh_config(demo_models, tiny_gpu_cluster(tmp_path / "c.yaml")).model_dump()
    raw["engine"] |= {"executor": "mps", "worker_pool": "shared"}
    raw["router"]["replan"] = None
    raw["meshes"][1]["models"] = [{"name": QWEN}]
    router = Router(parse_config(raw), LocalLauncher())
    server = BackgroundServer(create_app(router))
    server.start()
    a, b = router.meshes["mesh-a"].client, router.meshes["mesh-b"].client
    try:
        port = int(server.port)
        first = complete(port, MISTRAL)
        server.run(router.move(MISTRAL, "mesh-a", "mesh-b", "test"), 300)
        assert b.model_states()[MISTRAL] is ModelState.AWAKE
        assert a.model_states()[MISTRAL] is ModelState.ASLEEP  # listed there: a standby
        there = complete(port, MISTRAL)
        server.run(router.move(MISTRAL, "mesh-b", "mesh-a", "back"), 300)
        assert set(b.model_states()) == {QWEN}  # added there: removed, not left asleep
        assert router.routing.listed(MISTRAL) == ["mesh-a"]
        back = complete(port, MISTRAL)
        texts = {r["choices"][0]["text"] for r in (first, there, back)}
        assert len(texts) == 1 and first["usage"]["completion_tokens"] == TOKENS
    finally:
        server.stop()
    assert all(p.pid is None for p in (router.meshes[m].process for m in ("mesh-a", "mesh-b")))
