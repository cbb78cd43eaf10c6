"""What the seam reports (`Health`, `MeshHealth`) and what a mesh process is launched with."""

from __future__ import annotations

import json

import pytest

from muxserve.client.protocol import Health, MeshHealth, MeshState
from muxserve.config import MuxConfig, parse_config
from muxserve.mesh.runtime import MeshLaunch
from tests.router.conftest import plan_dict

OK, DOWN, STARTING, STOPPED = MeshState.OK, MeshState.DOWN, MeshState.STARTING, MeshState.STOPPED


def health(*states: MeshState) -> Health:
    return Health({f"m{i}": MeshHealth(s, (f"model-{i}",)) for i, s in enumerate(states)})


@pytest.mark.parametrize(
    ("states", "status"),
    [
        ((OK,), "ok"),
        ((OK, OK, OK), "ok"),
        ((OK, DOWN), "degraded"),
        ((STARTING, OK), "degraded"),
        ((OK, STOPPED, DOWN), "degraded"),
        ((DOWN,), "down"),
        ((DOWN, STARTING, STOPPED), "down"),
        ((), "down"),  # nothing is served
    ],
)
def test_status_ok_only_when_every_mesh_serves(states, status):
    assert health(*states).status == status


def test_to_json_shape():
    h = Health(
        {
            "mesh-a": MeshHealth(OK, ("llama-demo", "qwen-demo"), 101, "node-0"),
            "mesh-b": MeshHealth(
                DOWN, ("mistral-demo",), None, "node-1", restarts=2, error="it was killed"
            ),
        }
    )
    assert h.to_json() == {
        "status": "degraded",
        "meshes": {
            "mesh-a": {
                "status": "ok",
                "pid": 101,
                "node": "node-0",
                "models": ["llama-demo", "qwen-demo"],
                "restarts": 0,
                "resubmitted": 0,
            },
            "mesh-b": {
                "status": "down",
                "pid": None,
                "node": "node-1",
                "models": ["mistral-demo"],
                "restarts": 2,
                "resubmitted": 0,
                "error": "it was killed",
            },
        },
    }
    assert json.loads(json.dumps(h.to_json())) == h.to_json()  # plain JSON types only


# ---- MeshLaunch ------------------------------------------------------------------------------
def plan(demo_models, device: str) -> MuxConfig:
    return parse_config(plan_dict(demo_models, device=device))


def test_launch_round_trips_through_json(demo_models):
    config = plan(demo_models, "cpu")
    launch = MeshLaunch.of(config, "mesh-b", "ab" * 32)
    assert MeshLaunch.from_json(json.loads(json.dumps(launch.to_json()))) == launch
    assert (launch.mesh, launch.token, launch.host) == ("mesh-b", "ab" * 32, "127.0.0.1")
    assert MuxConfig.model_validate(launch.config) == config.for_mesh("mesh-b")
    assert [m["name"] for m in launch.config["models"]] == ["qwen-demo"]
    assert launch.config["meshes"] is None


def test_launch_without_a_host_listens_on_loopback(demo_models):
    data = MeshLaunch.of(plan(demo_models, "cpu"), "mesh-a", "00", host="10.0.0.7").to_json()
    assert data["host"] == "10.0.0.7"
    del data["host"]
    assert MeshLaunch.from_json(data).host == "127.0.0.1"


@pytest.mark.parametrize(
    ("device", "seen"),
    [("cuda:1", "cuda"), ("cuda", "cuda"), ("cpu", "cpu"), ("auto", "auto")],
)
def test_a_mesh_sees_its_gpus_from_cuda_0(demo_models, device, seen):
    """CUDA_VISIBLE_DEVICES holds the mesh's GPUs: "cuda:1" of the plan would be a wrong GPU."""
    launch = MeshLaunch.of(plan(demo_models, device), "mesh-c", "00")
    assert launch.config["engine"]["device"] == seen
    assert MuxConfig.model_validate(launch.config).engine.device == seen
