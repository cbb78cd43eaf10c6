"""A served model's descriptors, derived once for the engine and for the planner's simulator.

From a model's architecture (`HFModelConfig`) and its place in a plan (dtype, tensor-parallel
degree, SM and KV shares, rate, context caps) come its KV layout on one rank, the scheduler's
`ModelSlot` and its serving dtype. `MuxEngine` and `placement/simulator.py` both call
`describe_model`, so what is simulated is what is served. Torch-free: the planner runs
without torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from muxserve.config import EngineConfig, ModelEntry, SMShare
from muxserve.dtypes import dtype_bytes, resolve_dtype
from muxserve.errors import ConfigError
from muxserve.kv.layout import KVLayout
from muxserve.models.hf_config import HFModelConfig, check_divisible
from muxserve.scheduler.model_slot import ModelSlot

# The longest context served: per-position buffers (RoPE tables, ~4 x rotary_dim bytes a
# position) are sized by it. 1.6x the longest public context (Llama 4 Scout's 10M); a
# config.json claiming more must be capped with max_model_len.
MAX_SERVED_CONTEXT = 1 << 24


@dataclass(frozen=True)
class ModelDescriptor:
    """How one model is served on its mesh: dtype, TP degree, one rank's KV layout, its slot."""

    name: str
    config: HFModelConfig
    dtype: str  # "float32", "bfloat16" or "float16"
    tensor_parallel: int
    slot: ModelSlot  # what the scheduler knows: the layout below, limits, rate, shares

    @property
    def layout(self) -> KVLayout:
        """One rank's view of a pool block: `num_kv_heads // tensor_parallel` heads per layer.

        Every rank holds the same block ids in its own pool, each for its own heads, so the
        scheduler accounts one rank's blocks and each rank's pool is `num_blocks` long.
        """
        return self.slot.layout

    @property
    def max_model_len(self) -> int:
        return self.slot.max_model_len

    @property
    def sm_share(self) -> SMShare:
        return self.slot.sm_share

    @property
    def kv_share(self) -> float | None:
        return self.slot.kv_share


def describe_model(
    name: str,
    config: HFModelConfig,
    dtype: str,
    *,
    block_bytes: int,
    tensor_parallel: int = 1,
    sm_share: SMShare | None = None,
    rate: float = 1.0,
    kv_share: float | None = None,
    max_model_len: Iterable[int | None] = (),
    eos_token_ids: Iterable[int] = (),
    max_waiting: int = 1024,
    max_queue_wait_s: float | None = None,
) -> ModelDescriptor:
    """A model's descriptors from the facts of its config entry or its plan.

    `dtype` is the serving dtype, already resolved (`muxserve.dtypes.resolve_dtype`);
    `max_model_len` lists caps below the model's context length (None: no cap); the config's
    EOS ids are always stop tokens, `eos_token_ids` adds the tokenizer's. Raises ValueError
    when `tensor_parallel` does not divide the model's heads, ConfigError when the served
    context is past `MAX_SERVED_CONTEXT`.
    """
    check_divisible(config, tensor_parallel)
    layout = KVLayout(
        config.num_layers,
        config.num_kv_heads // tensor_parallel,
        config.head_dim,
        dtype_bytes(dtype),
        block_bytes,
    )
    served = served_context(name, config, max_model_len)
    slot = ModelSlot(
        name,
        layout,
        served,
        frozenset(config.eos_token_ids) | frozenset(eos_token_ids),
        rate,
        sm_share or SMShare(),
        max_waiting,
        kv_share,
        max_queue_wait_s,
    )
    return ModelDescriptor(name, config, dtype, tensor_parallel, slot)


def served_context(name: str, config: HFModelConfig, caps: Iterable[int | None]) -> int:
    """The context `name` is served with: its config's, capped by the `caps` that are set.

    ConfigError when that is past `MAX_SERVED_CONTEXT` (buffers are sized by it). The one
    rule for the engine and for the router, which needs it before any mesh reports.
    """
    set_caps = [c for c in caps if c is not None]
    served = min([config.max_position_embeddings, *set_caps])
    if served > MAX_SERVED_CONTEXT:
        raise ConfigError(
            f"{name}: config.json's max_position_embeddings is {config.max_position_embeddings} "
            f"and max_model_len is {min(set_caps) if set_caps else 'not set'}: more than the "
            f"{MAX_SERVED_CONTEXT} positions served at most (buffers are sized by them); set "
            "max_model_len (the model's, or engine.max_model_len) to the context to serve"
        )
    return served


def describe_entry(
    entry: ModelEntry,
    config: HFModelConfig,
    engine: EngineConfig,
    *,
    on_gpu: bool,
    eos_token_ids: Iterable[int] = (),
) -> ModelDescriptor:
    """`describe_model` for a config's model entry, as the engine serves it.

    `config` is the entry's checkpoint's architecture; `on_gpu` picks the default dtype
    (`resolve_dtype`) where the entry names none.
    """
    return describe_model(
        entry.name,
        config,
        resolve_dtype(entry.dtype, config.torch_dtype, on_gpu),
        block_bytes=engine.block_bytes,
        tensor_parallel=entry.tensor_parallel,
        sm_share=entry.sm_share,
        rate=entry.rate,
        kv_share=entry.kv_share,
        max_model_len=(entry.max_model_len, engine.max_model_len),
        eos_token_ids=eos_token_ids,
        max_waiting=entry.max_waiting,
        max_queue_wait_s=(
            entry.max_queue_wait_s
            if entry.max_queue_wait_s is not None
            else engine.max_queue_wait_s
        ),
    )
