"""A plan that cannot run where it is served fails before serving, with a message naming the mesh.

`check_plan` is tested against fake nodes (`NodeMemory`); the router and `muxserve serve` are
tested on this host with plans no host can hold.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from muxserve.config import MuxConfig, load_config, parse_config
from muxserve.errors import ConfigError
from muxserve.router.local import LocalLauncher
from muxserve.router.preflight import NodeMemory, check_plan
from muxserve.router.router import Router
from tests.router.conftest import plan_dict

GIB = 1 << 30
HOST = NodeMemory((), 64 * GIB)  # a CPU-only node
TWO_GPUS = NodeMemory((80 * GIB, 80 * GIB), 512 * GIB)
TRILLION_BYTES = 10**13  # a KV pool no host holds


def checkpoint_params(path: Path) -> int:
    """Parameters of a safetensors checkpoint, counted from its header (not from config.json)."""
    with open(path / "model.safetensors", "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def plan(demo_models: dict[str, Path], device: str = "cpu", **mesh_b: Any) -> MuxConfig:
    """The three-mesh demo plan with `mesh_b`'s fields changed."""
    raw = plan_dict(demo_models, device=device, executor="mps")  # mps: TP ranks are processes
    raw["meshes"][1].update(mesh_b)
    return parse_config(raw)


def refusal(config: MuxConfig, *nodes: NodeMemory) -> str:
    with pytest.raises(ConfigError) as e:
        check_plan(config, nodes)
    return str(e.value)


def child_pids() -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                out.add(int(entry.name))
    return out


# ---- check_plan ----------------------------------------------------------------------------------
def test_plans_that_fit_pass(demo_models):
    check_plan(plan(demo_models), [HOST])
    check_plan(plan(demo_models, device="cuda", gpus=[1]), [NodeMemory((GIB,) * 3, GIB)])


def test_a_gpu_the_node_lacks(demo_models):
    config = plan(demo_models, device="cuda", gpus=[3])  # mesh-c keeps GPU 2: also missing
    assert (
        refusal(config, TWO_GPUS) == "mesh 'mesh-b' needs GPU(s) [3] of node 0, which has GPUs 0-1"
    )


def test_a_gpu_plan_on_a_cpu_only_host_suggests_device_cpu(demo_models):
    assert refusal(plan(demo_models, device="auto"), HOST) == (
        "mesh 'mesh-a' needs GPU(s) [0] of node 0, which has no GPU; "
        "set engine.device: cpu to serve the plan on CPU"
    )


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_node_that_does_not_exist(demo_models, device):
    config = plan(demo_models, device=device, node=1)
    assert refusal(config, NodeMemory((GIB,) * 3, 512 * GIB)) == (
        "mesh 'mesh-b' is on node 1, but there are 1 node(s); "
        "serve a plan that spans nodes with --launcher ray"
    )


def test_weights_and_pool_over_the_usable_gpu_memory(demo_models):
    config = plan(demo_models, device="cuda", gpus=[1], kv_pool_bytes=3 * GIB // 2)
    config = config.model_copy(
        update={"engine": config.engine.model_copy(update={"gpu_memory_utilization": 0.25})}
    )
    assert refusal(config, NodeMemory((4 * GIB,) * 3, 512 * GIB)) == (
        "mesh 'mesh-b' does not fit: it needs 1.50 GiB (weights 0.00 GiB + KV pool 1.50 GiB) "
        "but has 1.00 GiB of GPU memory (x gpu_memory_utilization)"
    )


@pytest.mark.parametrize("tp", [1, 2])
def test_the_fit_is_exact_to_the_byte(demo_models, tp):
    """Weights (float16 on a GPU, 1/tp of them per GPU) plus the pool against the smallest GPU."""
    weights = -(-checkpoint_params(demo_models["qwen-demo"]) * 2 // tp)
    usable = int(GIB * 0.9)  # the default gpu_memory_utilization
    node = NodeMemory((80 * GIB, GIB, 80 * GIB, 80 * GIB), 512 * GIB)  # GPU 1 is the small one
    mesh_b = {"gpus": [1, 3], "models": [{"name": "qwen-demo", "tensor_parallel": tp}]}
    check_plan(plan(demo_models, "cuda", kv_pool_bytes=usable - weights, **mesh_b), [node])
    over = plan(demo_models, "cuda", kv_pool_bytes=usable - weights + 1, **mesh_b)
    assert refusal(over, node).startswith("mesh 'mesh-b' does not fit")


def test_a_cpu_pool_over_the_host_memory(demo_models):
    config = plan(demo_models, kv_pool_bytes=TRILLION_BYTES)
    assert refusal(config, HOST) == (
        "mesh 'mesh-b' does not fit: it needs 9313.23 GiB (weights 0.00 GiB + KV pool 9313.23 GiB) "
        "but has 64.00 GiB of host memory"
    )


# ---- on this host ------------------------------------------------------------------------------
def test_the_router_refuses_before_starting_any_mesh(demo_models):
    before = child_pids()
    with pytest.raises(ConfigError, match=r"^mesh 'mesh-b' does not fit: it needs 9313\.23 GiB"):
        Router(plan(demo_models, kv_pool_bytes=TRILLION_BYTES), LocalLauncher())
    assert child_pids() == before


def test_serve_exits_with_the_mesh_named_before_serving(demo_models, tmp_path):
    bad = tmp_path / "plan.yaml"
    raw = plan_dict(demo_models)
    raw["meshes"][1]["kv_pool_bytes"] = TRILLION_BYTES
    bad.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "muxserve.cli", "serve", "--config", str(bad), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "muxserve serve: error: mesh 'mesh-b' does not fit: it needs 9313.23 GiB"
    )
    assert "starting" not in proc.stderr  # no mesh was launched


def test_two_meshes_claiming_one_gpu_are_refused_when_the_plan_is_loaded(demo_models, tmp_path):
    path = tmp_path / "plan.yaml"
    raw = plan_dict(demo_models)
    raw["meshes"][1]["gpus"] = [0]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ")
    assert str(e.value).endswith("meshes 'mesh-a' and 'mesh-b' both claim GPU 0 of node 0")
