"""The same plan with `--launcher ray` on a local Ray instance: parity, kill and recover, exit.

Ray is started once for the module, bound to loopback, with 4 logical GPUs labelled H100 so
that `muxserve plan --cluster ray` and the launcher's GPU checks can be tested on a CPU host;
the plan's meshes run on CPU (`engine.device: cpu`) and ask Ray for no GPU.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from muxserve.config import MuxConfig, parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.engine import MuxEngine
from muxserve.errors import ConfigError
from muxserve.sampling_params import SamplingParams

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by Ray on import: loopback only
ray = pytest.importorskip("ray")

MESHES = {"mesh-a": "llama-demo", "mesh-b": "qwen-demo", "mesh-c": "mistral-demo"}
PROMPTS = ["Once upon a time", "The quick brown fox"]
TOKENS = 12


def plan(demo_models: dict[str, Path], device: str = "cpu", **mesh_b: Any) -> MuxConfig:
    return parse_config(
        {
            "models": [{"name": n, "path": str(p)} for n, p in demo_models.items()],
            "engine": {**DEMO_ENGINE, "device": device},
            "meshes": [
                {
                    "name": mesh,
                    "gpus": [i],
                    "models": [{"name": model}],
                    **(mesh_b if i == 1 else {}),
                }
                for i, (mesh, model) in enumerate(MESHES.items())
            ],
        }
    )


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(
        num_cpus=2,
        num_gpus=4,
        resources={"accelerator_type:H100": 1},
        include_dashboard=False,
        object_store_memory=128 << 20,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def post(url: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return dict(json.loads(r.read()))


def complete(url: str, model: str, prompt: str) -> tuple[int, dict[str, Any]]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    return post(f"{url}/v1/completions", body)


def wait_for(what: str, cond: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.05)  # polling an HTTP endpoint: there is no event to wait on


@pytest.fixture(scope="module")
def expected(demo_models: dict[str, Path]) -> dict[tuple[str, str], str]:
    """Greedy text of every (model, prompt) from one in-process engine (the reference)."""
    config = plan(demo_models).model_copy(update={"meshes": None})
    with MuxEngine(config) as engine:
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        out = {}
        for model in MESHES.values():
            for p, c in zip(PROMPTS, engine.generate(PROMPTS, params, model), strict=True):
                out[(model, p)] = c.text
        return out


@pytest.fixture(scope="module")
def served(local_ray: None, demo_models: dict[str, Path]) -> Iterator[tuple[str, Any]]:
    from muxserve.client.protocol import MeshState
    from muxserve.router.ray_launcher import RayLauncher
    from muxserve.router.router import Router
    from muxserve.router.supervisor import SupervisionSettings
    from muxserve.server.app import create_app
    from muxserve.server.background import BackgroundServer

    router = Router(plan(demo_models), RayLauncher(), SupervisionSettings(start_timeout=120))
    with BackgroundServer(create_app(router)) as url:
        yield url, router
    assert all(s.state is MeshState.STOPPED for s in router.meshes.values())


def test_three_actors_serve_the_plan_with_engine_parity(served, expected):
    url, _ = served
    health = get(f"{url}/health")
    assert health["status"] == "ok"
    assert {n: m["models"] for n, m in health["meshes"].items()} == {
        n: [model] for n, model in MESHES.items()
    }
    pids = [m["pid"] for m in health["meshes"].values()]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    assert [m["node"] for m in health["meshes"].values()] == ["127.0.0.1"] * 3
    for (model, prompt), text in expected.items():
        status, body = complete(url, model, prompt)
        assert status == 200, body
        assert body["choices"][0]["text"] == text


def test_sigkill_of_an_actor_503_then_ray_restarts_it(served, expected):
    url, _ = served
    victim = get(f"{url}/health")["meshes"]["mesh-b"]["pid"]
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()

    def refused() -> dict[str, Any] | None:
        status, body = complete(url, "qwen-demo", PROMPTS[0])
        return body if status == 503 else None

    body = wait_for("503", refused, 1.0)
    assert time.monotonic() - t0 < 1.0
    assert body["error"]["code"] == "mesh_unavailable"
    assert "mesh 'mesh-b'" in body["error"]["message"]
    for model in ("llama-demo", "mistral-demo"):  # the other meshes are untouched
        status, got = complete(url, model, PROMPTS[1])
        assert status == 200 and got["choices"][0]["text"] == expected[(model, PROMPTS[1])]

    def back() -> dict[str, Any] | None:
        h = get(f"{url}/health")
        return h if h["meshes"]["mesh-b"]["status"] == "ok" else None

    health = wait_for("restarted", back, 60.0)
    mesh_b = health["meshes"]["mesh-b"]
    assert (mesh_b["restarts"], health["status"]) == (1, "ok")
    assert mesh_b["pid"] != victim
    status, got = complete(url, "qwen-demo", PROMPTS[0])
    assert status == 200 and got["choices"][0]["text"] == expected[("qwen-demo", PROMPTS[0])]


def test_plan_cluster_from_ray(local_ray):
    from placement.ray_cluster import cluster_from_ray

    cluster = cluster_from_ray("ray")
    assert (cluster.gpu.name, cluster.nodes, cluster.gpus_per_node) == ("H100-80GB", 1, 4)


def test_gpus_the_ray_node_lacks_are_refused_before_starting(local_ray, demo_models):
    from muxserve.router.ray_launcher import RayLauncher
    from muxserve.router.router import Router

    actors = len(ray.util.list_named_actors(all_namespaces=True))
    bad = plan(demo_models, device="cuda", gpus=[4])  # the node has GPUs 0-3
    with pytest.raises(ConfigError, match=r"mesh 'mesh-b' needs GPU\(s\) \[4\] of node 0"):
        Router(bad, RayLauncher())
    two_nodes = plan(demo_models, device="cuda", node=1)
    with pytest.raises(ConfigError, match="mesh 'mesh-b' is on node 1, but there are 1 node"):
        Router(two_nodes, RayLauncher())
    assert len(ray.util.list_named_actors(all_namespaces=True)) == actors
