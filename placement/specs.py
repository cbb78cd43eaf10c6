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
class PlannerModel:
    """A model as the planner sees it: its name, checkpoint, serving dtype and architecture."""

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

    def weight_bytes_read(self, tokens: float) -> float:
        """Weight bytes one forward over `tokens` tokens reads from memory.

        Every dense weight once; of a routed-expert layer's experts, only those some token is
        routed to: with each token choosing k of E experts (uniform routing assumed),
        E * (1 - (1 - k/E)^tokens) of them in expectation. All experts are held in memory
        (`weight_bytes`); a one-token decode step reads k per layer.
        """
        c = self.config
        if not c.num_experts:
            return float(self.weight_bytes)
        e, k = c.num_experts, c.num_experts_per_tok
        expert_bytes = 3 * c.hidden_size * c.moe_intermediate_size * self.dtype_bytes
        touched = e * (1.0 - (1.0 - k / e) ** max(tokens, 1.0))
        return self.weight_bytes - c.num_moe_layers * (e - touched) * expert_bytes

    @cached_property
    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(self.dtype)

    @property
    def dtype_bytes(self) -> int:
        return dtype_bytes(self.dtype)

    @cached_property
    def _weight_flops_per_token(self) -> float:
        return self.config.flops_per_token(0)  # counts parameters: cached, the planner asks often

    def flops_per_token(self, context_len: float = 0.0) -> float:
        """Forward FLOPs of one token attending to `context_len` earlier tokens (of a routed-expert
        model, only its top-k experts' FLOPs count)."""
        return self._weight_flops_per_token + 4.0 * self.config.num_layers * (
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
    specs: tuple[PlannerModel, ...]
    engine: EngineConfig
    engine_is_default: bool  # no `engine:` section: the plan may size the KV pool


def load_models(path: str | Path) -> ModelSet:
    """Read a models file and each model's `config.json`; errors name the file and key."""
    p = Path(path)
    data = _local_paths_absolute(read_yaml(p), p.parent)
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
) -> PlannerModel:
    """A spec from an already-read config, in the dtype the engine will serve it in.

    `dtype` None: as `muxserve.dtypes.resolve_dtype` decides (on a GPU the checkpoint's half
    dtype, else float16); `on_gpu` False plans a CPU engine (float32).
    """
    ctx = config.max_position_embeddings
    return PlannerModel(
        name=name,
        path=path,
        dtype=resolve_dtype(dtype, config.torch_dtype, on_gpu),
        config=config,
        max_model_len=min(ctx, max_model_len) if max_model_len else ctx,
    )


def _local_paths_absolute(data: object, base: Path) -> object:
    """Models whose `path` names a folder relative to the models file get its absolute path
    before validation, so that `owner/name` there is that folder, not a Hub id."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        return data
    models = []
    for m in data["models"]:
        if isinstance(m, dict) and isinstance(m.get("path"), str):
            local = base / m["path"]
            if not Path(m["path"]).is_absolute() and local.exists():
                m = {**m, "path": str(local.resolve())}
        models.append(m)
    return {**data, "models": models}


def _resolve_path(path: str, base: Path) -> str:
    """Relative checkpoint paths are relative to the models file, made absolute for the plan."""
    p = Path(path)
    return str(p if p.is_absolute() else (base / p).resolve())
