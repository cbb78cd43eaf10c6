"""Re-planning with fakes: the routing table, `Router.move` (wake, switch, drain, sleep), and
the replanner's triggers and how it applies a proposal. The placement planner behind it is
tested in tests/placement/test_replanning.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from muxserve.client.protocol import MeshState
from muxserve.config import Mesh, ModelEntry, MuxConfig
from muxserve.output_processor import RequestOutput
from muxserve.router.mesh_process import LaunchContext
from muxserve.router.replan import Proposal, Replanner
from muxserve.router.router import Router
from muxserve.router.routing import RoutingTable
from muxserve.sampling_params import SamplingParams
from placement.migration import Decision
from tests.router.conftest import LLAMA, MISTRAL, QWEN, tiny_gpu_cluster, two_mesh_config


# ---- the routing table ------------------------------------------------------------------------
def test_routing_table(demo_models: dict[str, Path], tmp_path: Path) -> None:
    config = two_mesh_config(demo_models, tiny_gpu_cluster(tmp_path / "c.yaml"))
    assert config.meshes is not None
    t = RoutingTable(config.meshes)
    assert t.assignment() == {LLAMA: ("mesh-a",), MISTRAL: ("mesh-a",), QWEN: ("mesh-b",)}
    assert t.listed(MISTRAL) == ["mesh-a", "mesh-b"]
    t.activate(MISTRAL, "mesh-b")
    t.deactivate(MISTRAL, "mesh-a")
    assert t.targets(MISTRAL) == ["mesh-b"]
    t.deactivate(MISTRAL, "mesh-b")  # active nowhere: any listing (it wakes on demand)
    assert t.targets(MISTRAL) == ["mesh-a", "mesh-b"]
    with pytest.raises(ValueError, match="mesh 'mesh-b' does not list model 'llama-demo'"):
        t.activate(LLAMA, "mesh-b")
    t.begin("mesh-a", LLAMA)
    t.begin("mesh-a", LLAMA)
    assert t.inflight() == {("mesh-a", LLAMA): 2}

    async def drain() -> tuple[bool, bool]:
        short = await t.drained("mesh-a", LLAMA, 0.05)  # still two in flight
        waiter = asyncio.ensure_future(t.drained("mesh-a", LLAMA, 5.0))
        t.end("mesh-a", LLAMA)
        await asyncio.sleep(0)
        assert not waiter.done()
        t.end("mesh-a", LLAMA)
        return short, await waiter

    assert asyncio.run(drain()) == (False, True)
    assert t.inflight() == {}
    with pytest.raises(RuntimeError, match="more requests ended than began"):
        t.end("mesh-a", LLAMA)


def test_routing_table_listings_added_while_serving(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    config = two_mesh_config(demo_models, tiny_gpu_cluster(tmp_path / "c.yaml"), standby=False)
    assert config.meshes is not None
    t = RoutingTable(config.meshes)
    with pytest.raises(ValueError, match="mesh 'mesh-a' lists model 'llama-demo' already"):
        t.list_added(LLAMA, "mesh-a")
    t.list_added(LLAMA, "mesh-b")
    assert t.listed(LLAMA) == ["mesh-a", "mesh-b"] and t.active(LLAMA) == ["mesh-a"]
    assert t.added(LLAMA, "mesh-b") and not t.added(LLAMA, "mesh-a")
    assert t.added_on("mesh-b") == [LLAMA] and t.added_on("mesh-a") == []
    t.activate(LLAMA, "mesh-b")
    with pytest.raises(ValueError, match="llama-demo is active on mesh-b"):
        t.unlist(LLAMA, "mesh-b")
    t.deactivate(LLAMA, "mesh-a")
    t.unlist(LLAMA, "mesh-a")  # a plan's listing goes too
    assert t.listed(LLAMA) == ["mesh-b"] and t.assignment()[LLAMA] == ("mesh-b",)


# ---- Router.move over fake meshes -------------------------------------------------------------
class FakeMesh:
    """A mesh connection whose requests finish when the test says; records sleeps and wakes."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.connected = True
        self.info = None
        self.log = log
        self.open: dict[str, asyncio.Queue[RequestOutput]] = {}

    @property
    def outstanding(self) -> int:
        return len(self.open)

    async def add_request(self, model: str, prompt: list[int], params: object, rid: str) -> str:
        self.open[rid] = asyncio.Queue()
        self.log.append(f"{self.name}: add {rid}")
        return rid

    async def stream(self, rid: str) -> AsyncIterator[RequestOutput]:
        out = await self.open[rid].get()
        del self.open[rid]
        yield out

    def finish(self, rid: str, model: str) -> None:
        self.open[rid].put_nowait(RequestOutput(rid, model, "x", (1,), (), True, "length", 2, 3))

    def abort(self, rid: str) -> None:
        self.open.pop(rid, None)

    async def wake(self, model: str) -> float:
        self.log.append(f"{self.name}: wake {model}")
        return 0.25

    async def sleep(self, model: str, level: int = 1) -> None:
        self.log.append(f"{self.name}: sleep {model}")

    async def add_model(self, entry: ModelEntry, wake: bool = True) -> float:
        self.log.append(f"{self.name}: add_model {entry.name} wake={wake}")
        return 0.5

    async def remove_model(self, model: str) -> None:
        self.log.append(f"{self.name}: remove_model {model}")


class NoLauncher:
    def check(self, config: MuxConfig) -> None:
        return None

    def process(self, ctx: LaunchContext, mesh: Mesh) -> object:
        return object()


def fake_router(config: MuxConfig, log: list[str], planner: object = None) -> Router:
    r = Router(config, NoLauncher(), planner=planner or FixedPlanner(None))  # type: ignore[arg-type]
    for s in r.meshes.values():
        s.client = FakeMesh(s.name, log)  # type: ignore[assignment]
        s.state = MeshState.OK
    return r


def mesh(r: Router, name: str) -> FakeMesh:
    client = r.meshes[name].client
    assert isinstance(client, FakeMesh)
    return client


def test_move_wakes_switches_drains_then_sleeps(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    log: list[str] = []
    r = fake_router(two_mesh_config(demo_models, tiny_gpu_cluster(tmp_path / "c.yaml")), log)

    async def run() -> list[str]:
        await r.add_request(MISTRAL, [5, 6, 7], SamplingParams(), "old")
        reader = asyncio.ensure_future(_read(r, "old"))
        move = asyncio.ensure_future(r.move(MISTRAL, "mesh-a", "mesh-b", "test"))
        for _ in range(5):
            await asyncio.sleep(0)
        # woken on b, new requests go to b, the old one still runs on a: no sleep yet
        assert r.routing.active(MISTRAL) == ["mesh-b"] and not move.done()
        await r.add_request(MISTRAL, [5], SamplingParams(), "new")
        assert "mesh-a: sleep mistral-demo" not in log
        mesh(r, "mesh-a").finish("old", MISTRAL)
        await asyncio.wait_for(move, 5.0)
        return await reader

    assert asyncio.run(run()) == ["x"]
    assert log == [
        "mesh-a: add old",
        "mesh-b: wake mistral-demo",
        "mesh-b: add new",
        "mesh-a: sleep mistral-demo",
    ]
    assert r.routing.inflight() == {("mesh-b", MISTRAL): 1}
    snap = r.window.snapshot([MISTRAL])[MISTRAL]
    assert (snap.requests, snap.prompt_len, snap.output_len) == (2, 2.0, 3.0)
    with pytest.raises(ValueError, match="active only on mesh-b: it has nowhere else to go"):
        asyncio.run(r.move(MISTRAL, "mesh-b", None, "test"))


def test_move_to_a_mesh_that_does_not_list_it_adds_there_and_removes_here(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    log: list[str] = []
    config = two_mesh_config(
        demo_models, tiny_gpu_cluster(tmp_path / "c.yaml"), standby=False, add_models=True
    )
    r = fake_router(config, log)
    asyncio.run(r.move(LLAMA, "mesh-a", "mesh-b", "test"))
    assert log == [
        "mesh-b: add_model llama-demo wake=True",
        "mesh-a: remove_model llama-demo",
    ]
    assert r.routing.listed(LLAMA) == ["mesh-b"] and r.routing.active(LLAMA) == ["mesh-b"]
    assert r.routing.added(LLAMA, "mesh-b")
    # mesh-b restarts with its plan's models: the router adds llama back, asleep
    log.clear()
    asyncio.run(r._restore(r.meshes["mesh-b"]))
    assert log == ["mesh-b: add_model llama-demo wake=False"]
    # and back to mesh-a, which the plan listed it on: added there again, removed from b
    log.clear()
    asyncio.run(r.move(LLAMA, "mesh-b", "mesh-a", "test"))
    assert log == ["mesh-a: add_model llama-demo wake=True", "mesh-b: remove_model llama-demo"]
    assert r.routing.listed(LLAMA) == ["mesh-a"]
    with pytest.raises(ValueError, match="llama-demo is active on mesh-a: move it away first"):
        asyncio.run(r.remove_model(LLAMA, "mesh-a"))


async def _read(r: Router, rid: str) -> list[str]:
    return [out.text async for out in r.stream(rid)]


# ---- the replanner: when, and applying a proposal ---------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FixedPlanner:
    def __init__(self, proposal: Proposal | None) -> None:
        self.proposal = proposal
        self.calls: list[dict[str, tuple[str, ...]]] = []

    def propose(self, loads: object, active: dict[str, tuple[str, ...]]) -> Proposal | None:
        self.calls.append(dict(active))
        return self.proposal


def test_replanner_triggers_and_applies(demo_models: dict[str, Path], tmp_path: Path) -> None:
    log: list[str] = []
    config = two_mesh_config(
        demo_models,
        tiny_gpu_cluster(tmp_path / "c.yaml"),
        interval_s=60.0,
        drift=0.5,
        rate_floor=0.5,
        window_s=10.0,
    )
    target = {LLAMA: ("mesh-a",), MISTRAL: ("mesh-b",), QWEN: ("mesh-b",)}
    decision = Decision(True, 2.0, 60.0, ())
    planner = FixedPlanner(Proposal(target, decision, {MISTRAL: 4.0}))
    r = fake_router(config, log, planner)
    clock = Clock()
    r.window = type(r.window)(10.0, clock)
    assert config.router.replan is not None
    rp = Replanner(r, config.router.replan, planner, clock)
    assert rp.planned_rates == {LLAMA: 1.0, QWEN: 1.0, MISTRAL: 1.0}
    clock.t = 5.0
    for _ in range(5):  # 1 req/s of llama over 5 s: as planned
        r.window.arrived(LLAMA, 8)
    r.window.arrived(MISTRAL, 8)
    r.window.arrived(QWEN, 8)
    for _ in range(5):
        r.window.arrived(QWEN, 8)
    assert rp.observed_rates() == {LLAMA: 1.0, MISTRAL: 0.2, QWEN: 1.2}
    assert rp.due() == "drift 80% > 50%"  # mistral 1.0 -> 0.2: 0.8 of its planned rate
    change = asyncio.run(rp.replan("drift"))
    assert change.moves == ((MISTRAL, "mesh-a", "mesh-b"),)
    assert change.rates_before == {LLAMA: 1.0, QWEN: 1.0, MISTRAL: 1.0}
    assert change.rates_after == {LLAMA: 1.0, MISTRAL: 0.2, QWEN: 1.2}
    assert log == ["mesh-b: wake mistral-demo", "mesh-a: sleep mistral-demo"]
    assert r.routing.assignment() == target
    assert rp.due() is None  # the rates are those planned for now
    clock.t = 65.0
    assert rp.due() == "interval"
    # a proposal the rule rejects changes nothing
    planner.proposal = Proposal(target, Decision(False, 0.1, 60.0, ()), {})
    change = asyncio.run(rp.replan("interval"))
    assert change.moves == () and len(rp.history) == 2 and len(log) == 2
