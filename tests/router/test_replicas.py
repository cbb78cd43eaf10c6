"""A model on several meshes: requests go to the replica with the fewest outstanding requests,
skip replicas that are down, and get a 503 naming the meshes when none is up; a request whose
mesh is lost before its first output goes to another replica, once per replica.

The router is built over a launcher that starts nothing, and each mesh's connection is a fake
that counts what it is given, so routing is tested exactly and without processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from muxserve.client.protocol import MeshState
from muxserve.config import Mesh, MuxConfig, parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.errors import MeshUnavailableError, UnknownModelError
from muxserve.output_processor import RequestOutput
from muxserve.router.mesh_process import LaunchContext
from muxserve.router.router import Router
from muxserve.sampling_params import SamplingParams


class FakeClient:
    """Stands in for a RemoteEngineClient: up or down, with a count of open requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connected = True
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.info = None
        self.degraded: dict[str, str] = {}

    @property
    def outstanding(self) -> int:
        return len(self.added) - len(self.aborted)

    async def add_request(self, model: str, prompt: list[int], params: object, rid: str) -> str:
        self.added.append(rid)
        return rid

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)


class NoLauncher:
    def check(self, config: MuxConfig) -> None:
        return None

    def process(self, ctx: LaunchContext, mesh: Mesh) -> object:
        return SimpleNamespace(pid=None, node=None)  # never started: the test drives the clients


@pytest.fixture
def router(demo_models: dict[str, Path]) -> Router:
    llama = str(demo_models["llama-demo"])
    qwen = str(demo_models["qwen-demo"])
    config = parse_config(
        {
            "models": [{"name": "llama-demo", "path": llama}, {"name": "qwen-demo", "path": qwen}],
            "engine": {**DEMO_ENGINE, "device": "cpu"},
            "meshes": [
                {"name": "m0", "gpus": [0], "models": [{"name": "llama-demo"}]},
                {"name": "m1", "gpus": [1], "models": [{"name": "llama-demo"}]},
                {"name": "m2", "gpus": [2], "models": [{"name": "qwen-demo"}]},
            ],
        }
    )
    r = Router(config, NoLauncher())  # type: ignore[arg-type]
    for s in r.meshes.values():
        s.client = FakeClient(s.name)  # type: ignore[assignment]
        s.state = MeshState.OK
    return r


def fake(router: Router, mesh: str) -> FakeClient:
    client = router.meshes[mesh].client
    assert isinstance(client, FakeClient)
    return client


def add(router: Router, model: str, rid: str) -> None:
    asyncio.run(router.add_request(model, [5, 6], SamplingParams(), rid))


def test_fewest_outstanding_replica_wins(router: Router) -> None:
    for i in range(4):
        add(router, "llama-demo", f"r{i}")
    assert (fake(router, "m0").added, fake(router, "m1").added) == (["r0", "r2"], ["r1", "r3"])
    router.abort("r0")
    router.abort("r2")  # m0 now has none open: it takes the next two
    add(router, "llama-demo", "r4")
    add(router, "llama-demo", "r5")
    assert fake(router, "m0").added == ["r0", "r2", "r4", "r5"]
    assert fake(router, "m1").added == ["r1", "r3"]
    assert fake(router, "m2").added == []  # qwen's mesh never sees llama's requests
    router.abort("r4")
    assert fake(router, "m0").aborted == ["r0", "r2", "r4"]  # aborts go where the request went
    router.abort("unknown")  # ignored


def test_a_down_replica_is_skipped_and_none_up_is_a_503_naming_them(router: Router) -> None:
    fake(router, "m0").connected = False
    add(router, "llama-demo", "a")
    add(router, "llama-demo", "b")
    assert (fake(router, "m0").added, fake(router, "m1").added) == ([], ["a", "b"])
    fake(router, "m1").connected = False
    router.meshes["m1"].state = MeshState.DOWN
    with pytest.raises(MeshUnavailableError) as info:
        add(router, "llama-demo", "c")
    assert str(info.value) == (
        "model 'llama-demo' is unavailable: mesh 'm0' is down, mesh 'm1' is down; retry shortly"
    )
    add(router, "qwen-demo", "d")  # another model's mesh is untouched
    assert fake(router, "m2").added == ["d"]


def test_unknown_model(router: Router) -> None:
    with pytest.raises(UnknownModelError, match="'gpt-9' is not served here"):
        add(router, "gpt-9", "x")


def test_models_and_limits_before_the_meshes_report(router: Router) -> None:
    assert list(router.models) == ["llama-demo", "qwen-demo"]
    assert router.models["llama-demo"].max_model_len == 1024  # the checkpoint's context
    assert router.models["llama-demo"].tokenizer.encode("hi") != []


# ---- a mesh lost before the first output: the request goes to another replica --------------
class Streams(FakeClient):
    """A FakeClient whose streams give `outputs[rid]` then, with `lose`, lose the mesh."""

    def __init__(self, name: str, lose: bool = False, outputs: int = 0) -> None:
        super().__init__(name)
        self.lose = lose
        self.outputs = outputs
        self.refuse = False

    async def add_request(self, model: str, prompt: list[int], params: object, rid: str) -> str:
        if self.refuse:
            raise MeshUnavailableError(f"mesh {self.name!r} refused", self.name)
        return await super().add_request(model, prompt, params, rid)

    async def stream(self, rid: str) -> AsyncIterator[RequestOutput]:
        for i in range(self.outputs):
            yield output(rid, self.name, i + 1, finished=not self.lose and i + 1 == self.outputs)
        if self.lose:
            raise MeshUnavailableError(f"mesh {self.name!r}: its connection was lost", self.name)


def output(rid: str, text: str, n: int, finished: bool) -> RequestOutput:
    reason = "length" if finished else None
    return RequestOutput(rid, "llama-demo", text, (n,), (), finished, reason, 2, n)


def with_streams(router: Router, **clients: Streams) -> None:
    for name, client in clients.items():
        router.meshes[name].client = client  # type: ignore[assignment]


def read(router: Router, rid: str) -> list[RequestOutput]:
    async def go() -> list[RequestOutput]:
        await router.add_request("llama-demo", [5, 6], SamplingParams(), rid)
        return [o async for o in router.stream(rid)]

    return asyncio.run(go())


def test_lost_before_any_output_the_request_goes_to_the_other_replica(router: Router) -> None:
    with_streams(router, m0=Streams("m0", lose=True), m1=Streams("m1", outputs=3))
    got = read(router, "r")
    assert [(o.text, o.token_ids, o.finished) for o in got] == [
        ("m1", (1,), False),
        ("m1", (2,), False),
        ("m1", (3,), True),
    ]
    assert (fake(router, "m0").added, fake(router, "m1").added) == (["r"], ["r"])
    assert router.routing.inflight() == {}  # both meshes' counts ended
    assert router.resubmitted == {"m0": 1}
    health = router.health().to_json()["meshes"]
    assert isinstance(health, dict)
    assert (health["m0"]["resubmitted"], health["m1"]["resubmitted"]) == (1, 0)


def test_lost_after_an_output_ends_with_the_error_and_is_not_sent_again(router: Router) -> None:
    with_streams(router, m0=Streams("m0", lose=True, outputs=1), m1=Streams("m1", outputs=3))
    with pytest.raises(MeshUnavailableError, match="mesh 'm0': its connection was lost"):
        read(router, "r")
    assert fake(router, "m1").added == []
    assert router.routing.inflight() == {}
    assert router.resubmitted == {}


def test_each_replica_is_tried_once_then_the_last_error_ends_it(router: Router) -> None:
    with_streams(router, m0=Streams("m0", lose=True), m1=Streams("m1", lose=True))
    with pytest.raises(MeshUnavailableError, match="mesh 'm1': its connection was lost"):
        read(router, "r")
    assert (fake(router, "m0").added, fake(router, "m1").added) == (["r"], ["r"])
    assert router.routing.inflight() == {}
    assert router.resubmitted == {"m0": 1}


def test_no_replica_to_take_it_the_error_ends_it(router: Router) -> None:
    down = Streams("m1", outputs=3)
    down.connected = False
    with_streams(router, m0=Streams("m0", lose=True), m1=down)
    with pytest.raises(MeshUnavailableError, match="mesh 'm0'"):
        read(router, "r")
    refusing = Streams("m1", outputs=3)
    refusing.refuse = True
    with_streams(router, m0=Streams("m0", lose=True), m1=refusing)
    with pytest.raises(MeshUnavailableError, match="mesh 'm0'"):
        read(router, "s")
    assert router.routing.inflight() == {}
    assert router.resubmitted == {}


def test_lost_while_taking_the_request_the_other_replica_takes_it(router: Router) -> None:
    refusing = Streams("m0", outputs=3)
    refusing.refuse = True
    with_streams(router, m0=refusing, m1=Streams("m1", outputs=2))
    got = read(router, "r")
    assert [(o.text, o.finished) for o in got] == [("m1", False), ("m1", True)]
    assert (fake(router, "m0").added, fake(router, "m1").added) == ([], ["r"])
    assert router.routing.inflight() == {}
    assert router.resubmitted == {"m0": 1}
    fake(router, "m1").connected = False  # none left to take it: m0's error
    with pytest.raises(MeshUnavailableError, match="mesh 'm0' refused"):
        read(router, "s")
    assert router.routing.inflight() == {}
