"""The planner on the families of issue 13: public config.json files of Llama 3.1, Qwen3,
Gemma 2 and Mixtral, and a plan of the mixed 18-model zoo on 2 x 8 H100."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.models.hf_config import load_hf_config
from placement.algorithms import SolveOptions, solve
from placement.problem import load_problem
from placement.specs import load_models, spec_from_config
from tests.helpers.placement import CONFIGS

# parameter counts as published with each model (all of Mixtral's experts)
PUBLISHED = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "qwen3-8b": 8_190_735_360,
    "qwen3-32b": 32_762_123_264,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
    "mixtral-8x7b": 46_702_792_704,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_public_architectures_count_their_parameters(name: str) -> None:
    assert load_hf_config(CONFIGS / "models" / name).num_params() == PUBLISHED[name]


def test_mixtral_holds_every_expert_and_computes_with_two() -> None:
    spec = spec_from_config("m", "/x", load_hf_config(CONFIGS / "models" / "mixtral-8x7b"))
    expert = 3 * 4096 * 14336  # one expert's weights
    assert spec.dtype == "bfloat16" and spec.weight_bytes == 2 * 46_702_792_704
    active = 46_702_792_704 - 32 * 6 * expert  # 2 of 8 experts per layer
    assert spec.config.active_params() == active == 12_879_925_248
    assert spec.flops_per_token(0) == 2.0 * (active - 32000 * 4096)
    # a decode step of one token reads its 2 experts per layer; of many, nearly all 8
    assert spec.weight_bytes_read(1) == 2 * active
    assert spec.weight_bytes_read(1) < spec.weight_bytes_read(4) < spec.weight_bytes
    assert spec.weight_bytes_read(256) == pytest.approx(spec.weight_bytes, rel=1e-12)


def test_dense_models_read_all_their_weights() -> None:
    spec = spec_from_config("q", "/x", load_hf_config(CONFIGS / "models" / "qwen3-8b"))
    assert spec.weight_bytes_read(1) == spec.weight_bytes_read(64) == spec.weight_bytes


def test_the_mixed_zoo_plans_on_two_h100_nodes() -> None:
    problem = load_problem(
        CONFIGS / "models" / "zoo-18.yaml",
        CONFIGS / "clusters" / "2x8-h100.yaml",
        CONFIGS / "workloads" / "zoo-alpha0.9.yaml",
    )
    archs = {s.config.architecture for s in problem.specs}
    assert archs == {
        "LlamaForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "MixtralForCausalLM",
    }
    plan = solve(problem, ("greedy",), SolveOptions(), progress=None)["greedy"]
    assert sorted(m.name for m in plan.models) == sorted(s.name for s in problem.specs)
    assert plan.gpus_used == 16 and all(m.served > 0 for m in plan.models)


def test_a_relative_owner_name_folder_is_local_not_a_hub_id(tmp_path: Path) -> None:
    """`path: org/model` next to the models file is that folder, even though it looks like an id."""
    folder = tmp_path / "org" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        (CONFIGS / "models" / "qwen3-8b" / "config.json").read_text()
    )
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - {name: q, path: org/model}\n")
    [spec] = load_models(models).specs
    assert spec.path == str(folder.resolve()) and spec.config.architecture == "Qwen3ForCausalLM"
