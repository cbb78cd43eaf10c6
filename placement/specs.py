"""Model specs for planning, computed from each checkpoint's `config.json`.

Sizes, KV bytes and FLOPs come from the architecture (`HFModelConfig`), never from a name, so
"llm-3" and "my-finetune" plan the same as the base model they share a config with.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pydantic import Field

from muxserve.config import EngineConfig, ModelEntry
from muxserve.dtypes import dtype_bytes, resolve_dtype
from muxserve.errors import CheckpointError, ConfigError
from muxserve.models.hf_config import HFModelConfig, load_hf_config
from placement.files import Strict, read_yaml, validate


@dataclass(frozen=True)
class ModelSpec:
    """One model to place: its name, checkpoint, serving dtype and architecture."""

    name: str
    path: str
    dtype: str  # the dtype it is served in ("float16", "bfloat16", "float32")
    config: HFModelConfig
    max_model_len: int  # prompt + output tokens at most

    @cached_property
    def num_params(self) -> int:
        return self.config.num_params()

    @cached_property
    def weight_bytes(self) -> int:
        return self.config.weight_bytes(self.dtype)

    @cached_property
    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(self.dtype)

    @property
    def dtype_bytes(self) -> int:
        return dtype_bytes(self.dtype)

    def flops_per_token(self, context_len: float = 0.0) -> float:
        """Forward FLOPs of one token attending to `context_len` earlier tokens."""
        return self.config.flops_per_token(0) + 4.0 * self.config.num_layers * (
            self.config.q_size * context_len
        )

    def supports_tp(self, tp: int) -> bool:
        """Whether query and KV heads split evenly over `tp` GPUs."""
        return self.config.num_heads % tp == 0 and self.config.num_kv_heads % tp == 0

    @cached_property
    def arch_key(self) -> str:
        """The key of this architecture (and dtype) in a profile table."""
        c = self.config
        return (
            f"{c.architecture}-h{c.hidden_size}-i{c.intermediate_size}-l{c.num_layers}"
            f"-a{c.num_heads}-kv{c.num_kv_heads}-d{c.head_dim}-v{c.vocab_size}-{self.dtype}"
        )


class ModelsFile(Strict):
    """The `--models` file: the `models:` (and optional `engine:`) of a serving config."""

    models: list[ModelEntry] = Field(min_length=1)
    engine: EngineConfig = EngineConfig()


@dataclass(frozen=True)
class ModelSet:
    """The models file as read: entries with resolved paths, their specs, the engine."""

    source: str
    entries: tuple[ModelEntry, ...]
    specs: tuple[ModelSpec, ...]
    engine: EngineConfig
    engine_is_default: bool  # no `engine:` section: the plan may size the KV pool


def load_models(path: str | Path) -> ModelSet:
    """Read a models file and each model's `config.json`; errors name the file and key."""
    p = Path(path)
    data = read_yaml(p)
    raw = validate(ModelsFile, data, str(p))
    names = [m.name for m in raw.models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{p}: models: duplicate model names: {', '.join(dup)}")
    entries, specs = [], []
    on_gpu = raw.engine.device != "cpu"  # a plan is for GPUs unless the engine says cpu
    for i, entry in enumerate(raw.models):
        resolved = _resolve_path(entry.path, p.parent)
        entry = entry.model_copy(update={"path": resolved})
        try:
            hf = load_hf_config(resolved)
        except CheckpointError as e:
            raise ConfigError(f"{p}: models.{i}.path: {e}") from e
        entries.append(entry)
        specs.append(
            spec_from_config(
                entry.name, resolved, hf, entry.dtype, entry.max_model_len, on_gpu=on_gpu
            )
        )
    has_engine = isinstance(data, dict) and "engine" in data
    return ModelSet(str(p), tuple(entries), tuple(specs), raw.engine, not has_engine)


def spec_from_config(
    name: str,
    path: str,
    config: HFModelConfig,
    dtype: str | None = None,
    max_model_len: int | None = None,
    *,
    on_gpu: bool = True,
) -> ModelSpec:
    """A spec from an already-read config, in the dtype the engine will serve it in.

    `dtype` None: as `muxserve.dtypes.resolve_dtype` decides (on a GPU the checkpoint's half
    dtype, else float16); `on_gpu` False plans a CPU engine (float32).
    """
    ctx = config.max_position_embeddings
    return ModelSpec(
        name=name,
        path=path,
        dtype=resolve_dtype(dtype, config.torch_dtype, on_gpu),
        config=config,
        max_model_len=min(ctx, max_model_len) if max_model_len else ctx,
    )


def _resolve_path(path: str, base: Path) -> str:
    """Relative checkpoint paths are relative to the models file, made absolute for the plan."""
    p = Path(path)
    return str(p if p.is_absolute() else (base / p).resolve())
