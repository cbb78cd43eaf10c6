"""Factories for placement tests: tiny Llama configs, specs, clusters and problems."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `placement` is a top-level package next to `muxserve`
    sys.path.insert(0, str(ROOT))

from muxserve.models.hf_config import HFModelConfig, parse_hf_config  # noqa: E402
from placement.gpus import ClusterSpec, GPUSpec  # noqa: E402
from placement.params import ROOFLINE as PAPER_ROOFLINE  # noqa: E402
from placement.params import PlannerParams  # noqa: E402
from placement.problem import Problem, make_problem  # noqa: E402
from placement.specs import PlannerModel, spec_from_config  # noqa: E402
from placement.workload import SLO, Demand, Workload  # noqa: E402

CONFIGS = ROOT / "configs"

# The roofline as first written (the defaults are now fitted to A100 measurements, whose 5-9 ms
# overheads would swamp the tiny test models): the algorithm tests keep their own cost model.
ROOFLINE = PAPER_ROOFLINE.model_copy(update={"reserve_bytes_per_model": 64 << 20})


def llama_config(
    hidden: int = 512,
    layers: int = 4,
    heads: int = 8,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 1000,
) -> dict:
    """A Llama config.json as a dict."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": intermediate or 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "torch_dtype": "float16",
    }


def hf(**kw: int) -> HFModelConfig:
    return parse_hf_config(llama_config(**kw))


def spec(name: str = "m", **kw: int) -> PlannerModel:
    return spec_from_config(name, f"/ckpt/{name}", hf(**kw))


def gpu(**kw: float) -> GPUSpec:
    base = dict(
        name="TestGPU",
        memory_gib=4.0,
        peak_tflops=100.0,
        hbm_gbps=1000.0,
        sm_count=100,
        interconnect_gbps=100.0,
    )
    base.update(kw)
    return GPUSpec.model_validate(base)


def cluster(
    nodes: int = 1,
    gpus_per_node: int = 4,
    levels: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8),
    **gpu_kw: float,
) -> ClusterSpec:
    return ClusterSpec(
        gpu=gpu(**gpu_kw),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cost_model=ROOFLINE,
        planner=PlannerParams(sm_levels=levels),
    )


def workload(
    rates: list[float], prompt: int = 100, output: int = 100, slo: SLO | None = None
) -> Workload:
    slo = slo or SLO(scale=10.0)
    return Workload(tuple(Demand(f"m{i}", r, prompt, output, slo) for i, r in enumerate(rates)))


def problem(
    specs: list[PlannerModel], rates: list[float], cl: ClusterSpec | None = None, **wl_kw: object
) -> Problem:
    specs = [
        PlannerModel(f"m{i}", s.path, s.dtype, s.config, s.max_model_len)
        for i, s in enumerate(specs)
    ]
    return make_problem(specs, workload(rates, **wl_kw), cl or cluster())  # type: ignore[arg-type]


@pytest.fixture
def paper_problem() -> Problem:
    """The paper's 19 models on 4 × 8 A100-80GB at α = 0.9 (committed configs)."""
    from placement.problem import load_problem

    return load_problem(
        CONFIGS / "models" / "paper-19.yaml",
        CONFIGS / "clusters" / "paper-4x8-a100-80gb.yaml",
        CONFIGS / "workloads" / "paper-alpha0.9.yaml",
    )
