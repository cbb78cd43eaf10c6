"""The serving config (YAML), validated with pydantic at load time.

One schema for a hand-written config and for a plan written by `muxserve plan`: a plan is a
config whose `meshes` section says which GPUs host which models. Errors name the file and key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from muxserve.errors import ConfigError

Dtype = Literal["float32", "bfloat16", "float16"]


def default_cache_dir() -> Path:
    """Where generated demo models live: `$MUXSERVE_CACHE`, default `~/.cache/muxserve`."""
    return Path(os.environ.get("MUXSERVE_CACHE", "~/.cache/muxserve")).expanduser()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SMShare(_Strict):
    """Fraction of a GPU's SMs a model's prefill and decode jobs may use."""

    prefill: float = Field(1.0, gt=0.0, le=1.0)
    decode: float = Field(1.0, gt=0.0, le=1.0)


class ModelEntry(_Strict):
    """One served model."""

    name: str = Field(min_length=1)  # the name clients put in `model`
    path: str  # Hugging Face checkpoint folder; `~` and `$VARS` are expanded
    dtype: Dtype | None = None  # None: the checkpoint's dtype on GPU, float32 on CPU
    rate: float = Field(1.0, gt=0.0)  # expected requests/s: initial KV quota weight, planning
    max_model_len: int | None = Field(None, gt=0)  # cap below the model's context length
    sm_share: SMShare = SMShare()
    tensor_parallel: int = Field(1, ge=1)
    max_waiting: int = Field(1024, ge=1)  # bounded waiting queue (HTTP 429 beyond it)

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        os.environ.setdefault("MUXSERVE_CACHE", str(default_cache_dir()))
        return str(Path(os.path.expandvars(v)).expanduser())


class EngineConfig(_Strict):
    """How one engine (one mesh) runs its models."""

    kv_pool_bytes: int = Field(64 << 20, gt=0)  # bytes of the unified KV pool per device
    block_bytes: int = Field(16 << 10, gt=0)  # bytes of one physical block
    policy: Literal["adbs", "fcfs"] = "adbs"
    kv_mode: Literal["unified", "static"] = "unified"
    max_model_len: int | None = Field(None, gt=0)  # cap for every model
    prefill_token_budget: int = Field(2048, gt=0)  # tokens per prefill job
    max_batch_size: int = Field(256, gt=0)  # requests per job
    rebalance_interval: int = Field(8, gt=0)  # scheduler steps between quota rebalances
    sm_overload: float = Field(0.1, ge=0.0, le=1.0)  # SM admission allowance above 100%
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    executor: Literal["inline", "mps"] = "inline"
    seed: int = 0  # seed of unseeded requests' sampling

    @model_validator(mode="after")
    def _pool_holds_a_block(self) -> EngineConfig:
        if self.block_bytes > self.kv_pool_bytes:
            raise ValueError(
                f"block_bytes ({self.block_bytes}) exceeds kv_pool_bytes ({self.kv_pool_bytes})"
            )
        return self


class MeshModel(_Strict):
    """A model's place on a mesh, as the planner decided."""

    name: str
    tensor_parallel: int = Field(1, ge=1)
    sm_share: SMShare = SMShare()
    kv_share: float = Field(1.0, gt=0.0, le=1.0)  # share of the mesh's KV pool
    rate: float = Field(0.0, ge=0.0)  # requests/s the planner expects this mesh to serve


class Mesh(_Strict):
    """A group of GPUs of one node that run one engine."""

    name: str
    node: int = Field(0, ge=0)
    gpus: list[int] = Field(min_length=1)
    models: list[MeshModel] = Field(min_length=1)


class MuxConfig(_Strict):
    """A whole serving config: the models, the engine settings, and optionally a placement."""

    models: list[ModelEntry] = Field(min_length=1)
    engine: EngineConfig = EngineConfig()
    meshes: list[Mesh] | None = None  # written by `muxserve plan`; None: one engine, all models

    @model_validator(mode="after")
    def _names(self) -> MuxConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate model names: {', '.join(dup)}")
        for mesh in self.meshes or []:
            unknown = [m.name for m in mesh.models if m.name not in names]
            if unknown:
                raise ValueError(f"mesh {mesh.name!r} names unknown models: {', '.join(unknown)}")
        return self

    def model(self, name: str) -> ModelEntry:
        return next(m for m in self.models if m.name == name)


def load_config(path: str | Path) -> MuxConfig:
    """Read and validate a YAML config; errors name the file and the offending key."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: no such config file") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: malformed YAML: {e}") from e
    return parse_config(raw, source=str(p))


def parse_config(raw: object, source: str = "<config>") -> MuxConfig:
    """Validate an already-parsed config (a dict)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'models' and 'engine'")
    try:
        return MuxConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e)}") from e


def format_validation_error(e: ValidationError) -> str:
    """One line per problem, each naming the dotted key path, e.g. `models.0.rate`."""
    lines = []
    for err in e.errors():
        key = ".".join(str(x) for x in err["loc"]) or "<root>"
        lines.append(f"{key}: {err['msg']}")
    return "; ".join(lines)


def dump_config(config: MuxConfig, path: str | Path) -> None:
    """Write a config (or plan) that `load_config` reads back unchanged."""
    data = config.model_dump(mode="json", exclude_none=True)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
