"""Factories for the placement tests: tiny Llama configs, specs, clusters and problems."""

from __future__ import annotations

import random
from pathlib import Path

from muxserve.models.hf_config import HFModelConfig, parse_hf_config
from placement.gpus import ClusterSpec, GPUSpec
from placement.params import ROOFLINE as PAPER_ROOFLINE
from placement.params import PlannerParams
from placement.problem import Problem, make_problem
from placement.specs import PlannerModel, spec_from_config
from placement.workload import SLO, Demand, Workload

ROOT = Path(__file__).resolve().parents[2]
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


def random_problem(rng: random.Random) -> Problem:
    """Up to 4 models of 0.1–3.5 GiB on up to 4 GPUs of 4 GiB, loaded to make them compete."""
    nodes, per_node = rng.choice([(1, 4), (2, 2), (1, 2), (1, 3), (4, 1)])
    specs, rates = [], []
    for _ in range(rng.randint(1, 4)):
        hidden = rng.choice([512, 1024, 1536, 2048])
        layers = rng.choice([4, 8, 12, 16, 24, 28])
        specs.append(spec(hidden=hidden, layers=layers, heads=8))
        rates.append(round(rng.uniform(0.5, 60.0), 2))
    cl = cluster(nodes=nodes, gpus_per_node=per_node, levels=(0.1, 0.25, 0.5, 0.8))
    try:
        return problem(specs, rates, cl)
    except Exception:  # a model too big for the drawn cluster: draw again
        return random_problem(rng)
