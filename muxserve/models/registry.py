"""The model registry: a Hugging Face architecture name -> its family's config reader and class.

Everything that needs a model goes through here: `hf_config` (to read a config.json), the
loader (to build, validate and fill a model), tensor-parallel sharding, the executors, the
runner and the planner's spec reader. Adding a family is its model file, its config reader in
`family_config.py`, and one line below.

Torch-free: model classes are named as `"module:Class"` and imported on first use, so the
planner can read configs on a machine without torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from muxserve.errors import UnsupportedArchitectureError
from muxserve.models import family_config as fc

if TYPE_CHECKING:
    from muxserve.models.causal_lm import CausalLM
    from muxserve.models.hf_config import HFModelConfig


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: how to read its config.json, and the class that runs it."""

    architecture: str  # as in config.json's `architectures`, e.g. "Qwen3ForCausalLM"
    read_config: fc.ConfigReader  # the family's HFModelConfig fields from config.json
    model: str  # "module:Class" of its `CausalLM`, imported on first use (needs torch)


_DECODER = "muxserve.models.decoder:DecoderForCausalLM"

FAMILIES: dict[str, ModelFamily] = {
    f.architecture: f
    for f in (
        ModelFamily("LlamaForCausalLM", fc.read_llama, _DECODER),
        ModelFamily("MistralForCausalLM", fc.read_mistral, _DECODER),
        ModelFamily("Qwen2ForCausalLM", fc.read_qwen2, _DECODER),
        ModelFamily("Qwen3ForCausalLM", fc.read_qwen3, _DECODER),
        ModelFamily("Gemma2ForCausalLM", fc.read_gemma2, _DECODER),
        ModelFamily("Gemma3ForCausalLM", fc.read_gemma3, _DECODER),
        ModelFamily("Phi3ForCausalLM", fc.read_phi3, "muxserve.models.phi3:Phi3ForCausalLM"),
        ModelFamily(
            "MixtralForCausalLM", fc.read_mixtral, "muxserve.models.moe:MixtralForCausalLM"
        ),
        ModelFamily(
            "Qwen3MoeForCausalLM", fc.read_qwen3_moe, "muxserve.models.moe:Qwen3MoeForCausalLM"
        ),
    )
}

SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family(architecture: str | None, source: str = "config.json") -> ModelFamily:
    """The family of `architecture`; an unknown one is refused naming the supported ones."""
    found = FAMILIES.get(architecture) if architecture is not None else None
    if found is None:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return found


def model_class(architecture: str) -> type[CausalLM]:
    """The `CausalLM` subclass that runs `architecture`."""
    module, _, name = family(architecture).model.partition(":")
    cls: type[CausalLM] = getattr(importlib.import_module(module), name)
    return cls


def build_model(config: HFModelConfig, tp_size: int = 1) -> CausalLM:
    """An uninitialised model for `config` (one rank's shard when `tp_size > 1`).

    Call under `torch.device("meta")` to build without allocating, as the loader does.
    """
    return model_class(config.architecture)(config, tp_size)


def checkpoint_shapes(config: HFModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` holds, by its Hugging Face name, with its shape."""
    return model_class(config.architecture).checkpoint_shapes(config)
