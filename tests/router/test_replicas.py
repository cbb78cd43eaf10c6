"""A model on several meshes: requests go to the replica with the fewest outstanding requests,
skip replicas that are down, and get a 503 naming the meshes when none is up.

The router is built over a launcher that starts nothing, and each mesh's connection is a fake
that counts what it is given, so routing is tested exactly and without processes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from muxserve.client.protocol import MeshState
from muxserve.config import Mesh, MuxConfig, parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.errors import MeshUnavailableError, UnknownModelError
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
        return object()  # never started: the test drives the clients


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
