"""Checks of a plan against the machines it will run on, before anything is started.

A plan that names GPUs a node does not have, or a mesh whose weights and KV pool do not fit
its memory, fails here with a message naming the mesh, rather than minutes later in a child
process's traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from muxserve.config import CPU_KV_POOL_BYTES, Mesh, MuxConfig
from muxserve.dtypes import resolve_dtype
from muxserve.errors import ConfigError
from muxserve.models.hf_config import HFModelConfig, load_hf_config

GIB = float(1 << 30)


@dataclass(frozen=True)
class NodeMemory:
    """What one node offers a mesh: its GPUs' memory (bytes each), or its host memory."""

    gpus: tuple[int, ...]  # memory of GPU 0, 1, ...; () on a CPU-only node
    host_bytes: int


def local_node() -> NodeMemory:
    """This host: its GPUs as `nvidia-smi` lists them (no CUDA context is created here, so
    the MPS daemon a mesh starts later still governs every process), and its memory."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return NodeMemory(_nvidia_smi_gpus(), host)


def _nvidia_smi_gpus() -> tuple[int, ...]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(int(float(x)) << 20 for x in out.split() if x.strip())  # MiB


def check_plan(config: MuxConfig, nodes: Sequence[NodeMemory]) -> None:
    """ConfigError naming the mesh if a mesh's node or GPUs do not exist, or if what it must
    hold (weights per GPU, plus the pool where its size is set) is over its memory."""
    on_cpu = config.engine.device == "cpu"
    hf = {m.name: load_hf_config(m.path) for m in config.models}  # read once, not per mesh
    host_use: dict[int, list[tuple[str, int]]] = {}  # node -> (mesh, bytes) of its CPU meshes
    for mesh in config.meshes or []:
        if mesh.node >= len(nodes):
            raise ConfigError(
                f"mesh {mesh.name!r} is on node {mesh.node}, but there are {len(nodes)} "
                "node(s); serve a plan that spans nodes with --launcher ray"
            )
        node = nodes[mesh.node]
        if on_cpu:
            need = _check_fits(config, hf, mesh, node.host_bytes, "host memory", cpu=True)
            host_use.setdefault(mesh.node, []).append((mesh.name, need))
            continue
        missing = [g for g in mesh.gpus if g >= len(node.gpus)]
        if missing:
            have = f"GPUs 0-{len(node.gpus) - 1}" if node.gpus else "no GPU"
            raise ConfigError(
                f"mesh {mesh.name!r} needs GPU(s) {missing} of node {mesh.node}, which has "
                f"{have}" + ("; set engine.device: cpu to serve the plan on CPU" * (not node.gpus))
            )
        least = min(node.gpus[g] for g in mesh.gpus)
        usable = int(least * config.engine.gpu_memory_utilization)
        _check_fits(config, hf, mesh, usable, "GPU memory (x gpu_memory_utilization)", cpu=False)
    for node_index, uses in host_use.items():  # CPU meshes of a node share its memory
        total = sum(b for _, b in uses)
        if len(uses) > 1 and total > nodes[node_index].host_bytes:
            names = ", ".join(repr(n) for n, _ in uses)
            raise ConfigError(
                f"meshes {names} together need {total / GIB:.2f} GiB but node {node_index} has "
                f"{nodes[node_index].host_bytes / GIB:.2f} GiB of host memory"
            )


def _check_fits(
    config: MuxConfig,
    hf: dict[str, HFModelConfig],
    mesh: Mesh,
    memory: int,
    what: str,
    *,
    cpu: bool,
) -> int:
    """The bytes `mesh` needs per device; ConfigError naming it if that is over `memory`.

    `hf` is each model's architecture by name."""
    sub = config.for_mesh(mesh)
    weights = 0
    for m in sub.models:
        arch = hf[m.name]
        total = arch.weight_bytes(resolve_dtype(m.dtype, arch.torch_dtype, on_gpu=not cpu))
        # on a CPU every rank shares the one memory; on GPUs each holds 1/tp
        weights += total if cpu else -(-total // m.tensor_parallel)
    pool = sub.engine.kv_pool_bytes or (CPU_KV_POOL_BYTES if cpu else 0)  # GPU: sized to fit
    if cpu:
        pool *= max(m.tensor_parallel for m in sub.models)  # a pool per rank
    if weights + pool > memory:
        raise ConfigError(
            f"mesh {mesh.name!r} does not fit: it needs {(weights + pool) / GIB:.2f} GiB "
            f"(weights {weights / GIB:.2f} GiB + KV pool {pool / GIB:.2f} GiB) but has "
            f"{memory / GIB:.2f} GiB of {what}"
        )
    return weights + pool
