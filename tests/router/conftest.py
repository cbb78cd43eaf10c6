"""A plan of the three demo models on three CPU meshes, one model each: what the router serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
