"""`muxserve plan --cluster ray[:ADDRESS]`: the cluster read from a running Ray cluster.

Nodes and GPUs per node come from Ray (the nodes with GPUs, numbered as `--launcher ray`
numbers them); the GPU type from Ray's `accelerator_type` label. A cluster whose nodes differ
is planned on the GPUs every node has.
"""

from __future__ import annotations

import logging

from muxserve.errors import ConfigError
from placement.gpus import BUILTIN_GPUS, ClusterSpec

log = logging.getLogger(__name__)

# Ray's accelerator labels -> our GPU types (Ray says "A100" for both sizes: the 80 GB one is
# what clusters run today; a cluster file says otherwise where needed)
RAY_ACCELERATORS = {
    "A100": "A100-80GB",
    "A100-80G": "A100-80GB",
    "A100-40G": "A100-40GB",
    "H100": "H100-80GB",
    "H200": "H200",
    "L40S": "L40S",
}


def is_ray_cluster(spec: str) -> bool:
    """Whether a `--cluster` argument names a Ray cluster ("ray" or "ray:ADDRESS")."""
    return spec == "ray" or spec.startswith("ray:")


def cluster_from_ray(spec: str) -> ClusterSpec:
    """The ClusterSpec of the Ray cluster `spec` names; ConfigError if it has no usable GPUs."""
    try:
        from muxserve.router.ray_nodes import alive_nodes, connect
    except ImportError as e:  # pragma: no cover - ray_nodes imports ray lazily
        raise ConfigError("--cluster ray needs Ray: pip install 'muxserve[ray]'") from e
    address = spec.split(":", 1)[1] if ":" in spec else None
    try:
        connect(address)
    except ImportError as e:
        raise ConfigError("--cluster ray needs Ray: pip install 'muxserve[ray]'") from e
    nodes = alive_nodes(with_gpus=True)
    if not nodes:
        raise ConfigError(f"--cluster {spec}: the Ray cluster has no alive node with GPUs")
    labels = sorted({n.accelerator or "unknown" for n in nodes})
    known = [RAY_ACCELERATORS.get(label) for label in labels]
    if len(labels) != 1 or known[0] is None:
        raise ConfigError(
            f"--cluster {spec}: the Ray cluster's GPUs are {', '.join(labels)}; planning needs "
            f"one known type ({', '.join(RAY_ACCELERATORS)}): give a cluster file instead"
        )
    per_node = min(n.gpus for n in nodes)
    if any(n.gpus != per_node for n in nodes):
        log.warning(
            "Ray nodes have %s GPUs: planning on %d per node", [n.gpus for n in nodes], per_node
        )
    return ClusterSpec(gpu=BUILTIN_GPUS[known[0]], nodes=len(nodes), gpus_per_node=per_node)
