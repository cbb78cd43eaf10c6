"""Plans the router tests serve: the three demo models on three CPU meshes, one model each;
and two meshes with a standby model, for re-planning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from muxserve.config import MuxConfig, parse_config
from muxserve.demo import DEMO_ENGINE, DEMO_RATES

# mesh -> the one model it serves
MESHES = {"mesh-a": "llama-demo", "mesh-b": "qwen-demo", "mesh-c": "mistral-demo"}


def plan_dict(demo_models: dict[str, Path], **engine: Any) -> dict[str, Any]:
    """The plan as YAML would hold it: device cpu, mesh-x on GPU i (ignored on a CPU)."""
    return {
        "models": [
            {"name": n, "path": str(p), "rate": DEMO_RATES[n]} for n, p in demo_models.items()
        ],
        "engine": {**DEMO_ENGINE, "device": "cpu", **engine},
        "meshes": [
            {"name": mesh, "gpus": [i], "models": [{"name": model}]}
            for i, (mesh, model) in enumerate(MESHES.items())
        ],
    }


def demo_plan(demo_models: dict[str, Path], **engine: Any) -> MuxConfig:
    return parse_config(plan_dict(demo_models, **engine))


LLAMA, QWEN, MISTRAL = "llama-demo", "qwen-demo", "mistral-demo"


def tiny_gpu_cluster(path: Path) -> str:
    """Two GPUs slow enough that the demo models' rates of a few req/s bind."""
    path.write_text(
        yaml.safe_dump(
            {
                "gpu": {"type": "A100-80GB", "peak_tflops": 0.0005, "hbm_gbps": 0.03},
                "nodes": 1,
                "gpus_per_node": 2,
            }
        )
    )
    return str(path)


def two_mesh_config(
    demo: dict[str, Path], cluster: str, standby: bool = True, **replan: Any
) -> MuxConfig:
    """mesh-a serves llama and mistral; mesh-b serves qwen and (with `standby`) lists mistral
    as standby."""
    b_models: list[dict[str, Any]] = [{"name": QWEN}]
    if standby:
        b_models.append({"name": MISTRAL, "initial_state": "asleep"})
    return parse_config(
        {
            "models": [{"name": n, "path": str(p), "rate": 1.0} for n, p in demo.items()],
            "engine": {**DEMO_ENGINE, "device": "cpu"},
            "meshes": [
                {"name": "mesh-a", "gpus": [0], "models": [{"name": LLAMA}, {"name": MISTRAL}]},
                {"name": "mesh-b", "gpus": [1], "models": b_models},
            ],
            "router": {"replan": {"cluster": cluster, "move_cost_s": 1.0, **replan}},
        }
    )
