"""A Ray cluster's nodes as a plan numbers them: node k is the k-th alive node by address.

`muxserve plan --cluster ray` counts GPUs from the same list that `--launcher ray` places
meshes on, so "node 1" means the same machine to both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 << 20  # a local instance stores no objects of ours to speak of


@dataclass(frozen=True)
class RayNode:
    """One alive Ray node: where it is and what it offers."""

    node_id: str
    address: str  # the IP Ray reaches it at
    gpus: int
    memory_bytes: int  # Ray's schedulable memory on it
    accelerator: str | None  # Ray's `accelerator_type:...` label (e.g. "H100"), if any

    @property
    def affinity_resource(self) -> str:
        """The resource only this node has: a bundle asking for a sliver of it lands here."""
        return f"node:{self.address}"


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS); with neither, start a local instance
    that binds to loopback only. Does nothing if this process is connected already."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # On one host, every Ray process on 127.0.0.1, nothing on a network interface. Ray
        # reads this when it is imported: set it first.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        _node_ip_address="127.0.0.1",
    )


def alive_nodes(*, with_gpus: bool) -> list[RayNode]:
    """The cluster's alive nodes (only those with GPUs when `with_gpus`), in plan order."""
    import ray

    nodes = [_node(n) for n in ray.nodes() if n.get("Alive")]
    if with_gpus:
        nodes = [n for n in nodes if n.gpus > 0]
    return sorted(nodes, key=lambda n: (_ip_key(n.address), n.node_id))


def _node(raw: dict[str, Any]) -> RayNode:
    res: dict[str, float] = raw.get("Resources", {})
    accel = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
    return RayNode(
        node_id=str(raw["NodeID"]),
        address=str(raw["NodeManagerAddress"]),
        gpus=int(res.get("GPU", 0)),
        memory_bytes=int(res.get("memory", 0)),
        accelerator=accel,
    )


def _ip_key(address: str) -> tuple[int, tuple[int, ...], str]:
    """IPv4 addresses by number (10.0.0.9 before 10.0.0.10), anything else after, by name."""
    parts = address.split(".")
    if len(parts) == 4 and all(p.isdigit() for p in parts):
        return (0, tuple(int(p) for p in parts), "")
    return (1, (), address)
