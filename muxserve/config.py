"""The serving config (YAML), validated with pydantic at load time.

One schema for a hand-written config and for a plan written by `muxserve plan`: a plan is a
config whose `meshes` section says which GPUs host which models. Errors name the file and key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from muxserve.dtypes import Dtype
from muxserve.errors import CheckpointError, ConfigError
from muxserve.models.hub import resolve_checkpoint

InitialState = Literal["awake", "asleep"]
CPU_KV_POOL_BYTES = 64 << 20  # the KV pool on a CPU when the config does not size it


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
    path: str  # a checkpoint folder (`~`, `$VARS` expanded), or a Hub id (`owner/name`)
    dtype: Dtype | None = None  # None: the checkpoint's dtype on GPU, float32 on CPU
    rate: float = Field(1.0, gt=0.0)  # expected requests/s: initial KV quota weight, planning
    max_model_len: int | None = Field(None, gt=0)  # cap below the model's context length
    sm_share: SMShare = SMShare()
    tensor_parallel: int = Field(1, ge=1)
    max_waiting: int = Field(1024, ge=1)  # bounded waiting queue (HTTP 429 beyond it)
    # HTTP 429 also when the waiting requests would take longer than this at the model's
    # recent service rate; None: the engine's max_queue_wait_s
    max_queue_wait_s: float | None = Field(None, gt=0.0)
    kv_share: float | None = Field(None, gt=0.0, le=1.0)  # initial share of the KV pool;
    # None: in proportion to rate x KV bytes per token (a plan sets it per mesh)
    revision: str | None = None  # a Hub id's branch, tag or commit; ignored for a local folder
    # "asleep": listed but not loaded (asleep at level 2) until a request or a wake needs it
    initial_state: InitialState = "awake"

    @model_validator(mode="before")
    @classmethod
    def _resolve_hub_id(cls, data: Any) -> Any:
        """A `path` that is a Hugging Face model id (`owner/name`, nothing local by that name)
        becomes its snapshot folder in the Hugging Face cache (muxserve/models/hub.py)."""
        if not isinstance(data, dict) or not isinstance(data.get("path"), str):
            return data
        path = _expand_path(data["path"])
        try:
            resolved = resolve_checkpoint(path, data.get("revision"))
        except CheckpointError as e:
            raise ValueError(str(e)) from e
        return data if resolved == path else {**data, "path": resolved}

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return _expand_path(v)


def _expand_path(path: str) -> str:
    """`~` and `$VARS` expanded; `$MUXSERVE_CACHE` defaults to `default_cache_dir()`."""
    os.environ.setdefault("MUXSERVE_CACHE", str(default_cache_dir()))
    return str(Path(os.path.expandvars(path)).expanduser())


class ResidencyConfig(_Strict):
    """Which models of an engine stay awake when they do not all fit (docs/elastic.md)."""

    # bytes every awake model's weights may take at once, per device; None: on a GPU what is
    # free when a model wakes, on a CPU no limit
    weights_budget_bytes: int | None = Field(None, gt=0)
    half_life_s: float = Field(60.0, gt=0.0)  # of a model's decayed request rate (its value)
    min_residency_s: float = Field(10.0, ge=0.0)  # awake at least this long before it may sleep
    sleep_level: Literal[1, 2] = 1  # of a model put to sleep to make room
    wake_timeout_s: float = Field(30.0, gt=0.0)  # a request waits this long for room, at most
    # an awake model idle this long is put to sleep even without pressure; None: never
    idle_sleep_s: float | None = Field(None, gt=0.0)


class EngineConfig(_Strict):
    """How one engine (one mesh) runs its models."""

    # bytes of the unified KV pool per device; None: on a GPU what `gpu_memory_utilization`
    # leaves after the weights, on a CPU `CPU_KV_POOL_BYTES`
    kv_pool_bytes: int | None = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)  # of each GPU's memory, at most
    block_bytes: int = Field(16 << 10, gt=0)  # bytes of one physical block
    policy: Literal["adbs", "fcfs"] = "adbs"
    kv_mode: Literal["unified", "static"] = "unified"
    max_model_len: int | None = Field(None, gt=0)  # cap for every model
    # every model's bound on its queue's expected wait (a model's own wins); None: no bound
    max_queue_wait_s: float | None = Field(None, gt=0.0)
    prefill_token_budget: int = Field(2048, gt=0)  # tokens per prefill job
    max_batch_size: int = Field(256, gt=0)  # requests per job
    rebalance_interval: int = Field(8, gt=0)  # scheduler steps between quota rebalances
    sm_overload: float = Field(0.1, ge=0.0, le=1.0)  # SM admission allowance above 100%
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    executor: Literal["inline", "mps"] = "inline"
    seed: int = 0  # seed of unseeded requests' sampling
    # mps: a job with no result after job_timeout_s + job_timeout_per_token_s x its tokens
    # has a hung worker: the worker is killed and restarted, its requests recomputed
    job_timeout_s: float = Field(60.0, gt=0.0)
    job_timeout_per_token_s: float = Field(0.01, ge=0.0)
    # mps: a running job whose worker makes no progress this long (stopped; on a CPU, no CPU
    # time used) is hung too, however far its deadline; None: only the deadline counts
    job_stall_s: float | None = Field(10.0, gt=0.0)
    # mps: start a model's worker processes with the engine ("eager") or at its first job
    # ("lazy"); stop those idle this long (None: never), to start them again when needed
    worker_start: Literal["eager", "lazy"] = "eager"
    # mps: worker processes per (model, phase) ("per_model"), or one per (phase, SM-share
    # class) that every tp=1 model attaches to ("shared"; docs/executor.md)
    worker_pool: Literal["per_model", "shared"] = "per_model"
    # a request not finished this long after it arrived ends with a clear timeout error (HTTP
    # 504, or an error event in a stream), queued or running; None: it waits as long as it takes
    request_timeout_s: float | None = Field(None, gt=0.0)
    worker_idle_stop_s: float | None = Field(None, gt=0.0)
    residency: ResidencyConfig = ResidencyConfig()  # sleep and wake under memory pressure

    @model_validator(mode="after")
    def _pool_holds_a_block(self) -> EngineConfig:
        if self.kv_pool_bytes is not None and self.block_bytes > self.kv_pool_bytes:
            raise ValueError(
                f"block_bytes ({self.block_bytes}) exceeds kv_pool_bytes ({self.kv_pool_bytes})"
            )
        return self


class MeshModel(_Strict):
    """A model's place on a mesh, as the planner decided; what is unset is the model's own."""

    name: str
    tensor_parallel: int | None = Field(None, ge=1)
    sm_share: SMShare | None = None
    kv_share: float | None = Field(None, gt=0.0, le=1.0)  # initial share of the mesh's pool
    rate: float | None = Field(None, ge=0.0)  # requests/s the planner expects this mesh to serve
    # None: the model's own; "asleep": listed here but not loaded until needed (so that a
    # model can be moved to this mesh by waking it here)
    initial_state: InitialState | None = None


class Mesh(_Strict):
    """A group of GPUs of one node that run one engine."""

    name: str = Field(min_length=1)
    node: int = Field(0, ge=0)
    gpus: list[int] = Field(min_length=1)
    models: list[MeshModel] = Field(min_length=1)
    kv_pool_bytes: int | None = Field(None, gt=0)  # this mesh's pool per GPU; None: engine's
    # what its awake models' weights may take; None: engine.residency.weights_budget_bytes
    weights_budget_bytes: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Mesh:
        if any(g < 0 for g in self.gpus):
            raise ValueError(f"mesh {self.name!r}: GPU indices must be >= 0, got {self.gpus}")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"mesh {self.name!r} lists a GPU twice: {self.gpus}")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"mesh {self.name!r} lists {', '.join(dup)} twice")
        for m in self.models:
            if m.tensor_parallel is not None and m.tensor_parallel > len(self.gpus):
                raise ValueError(
                    f"mesh {self.name!r}: {m.name} has tensor_parallel={m.tensor_parallel} "
                    f"but the mesh has {len(self.gpus)} GPUs"
                )
        return self


class ReplanConfig(_Strict):
    """Re-planning while serving (muxserve/router/replan.py): when to re-run the planner on the
    rates the router measures, and what a move costs."""

    cluster: str  # cluster file (as for `muxserve plan`): the cost model's GPUs
    interval_s: float = Field(60.0, gt=0.0)  # re-plan at least this often
    window_s: float = Field(30.0, gt=0.0)  # rates and lengths over the last this many seconds
    drift: float = Field(0.5, gt=0.0)  # ...and sooner when a rate moves this far (relative)
    rate_floor: float = Field(0.5, gt=0.0)  # req/s: rates below it drift in units of it
    check_s: float = Field(1.0, gt=0.0)  # how often the drift is looked at
    horizon_s: float | None = Field(None, gt=0.0)  # a plan's gain counts this long; None: interval
    move_cost_s: float | None = Field(None, ge=0.0)  # a model's load time; None: from its weights
    time_limit_s: float = Field(5.0, gt=0.0)  # for the planner, off the event loop
    # a model may move to a mesh that does not list it (the router adds it there, and removes
    # it from the mesh it leaves); false: only to meshes that list it, as a standby at least
    add_models: bool = False
    drain_timeout_s: float = Field(300.0, gt=0.0)  # requests left on a model's old mesh, at most


class RouterConfig(_Strict):
    """How the router watches a plan's meshes (ignored without `meshes:`)."""

    start_timeout_s: float = Field(600.0, gt=0.0)  # a mesh loading its models, at most
    ping_interval_s: float = Field(1.0, gt=0.0)  # liveness pings to every mesh
    hang_timeout_s: float = Field(30.0, gt=0.0)  # no answer this long: killed and restarted
    backoff_initial_s: float = Field(0.5, gt=0.0)  # first restart delay, doubled per failure
    backoff_max_s: float = Field(30.0, gt=0.0)
    replan: ReplanConfig | None = None  # None: the plan stays as it is


class MuxConfig(_Strict):
    """A whole serving config: the models, the engine settings, and optionally a placement."""

    models: list[ModelEntry] = Field(min_length=1)
    engine: EngineConfig = EngineConfig()
    meshes: list[Mesh] | None = None  # written by `muxserve plan`; None: one engine, all models
    router: RouterConfig = RouterConfig()

    @model_validator(mode="after")
    def _names(self) -> MuxConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate model names: {', '.join(dup)}")
        if self.engine.executor == "inline":  # TP ranks are processes
            tp = [(f"models.{i}", m.name, m.tensor_parallel) for i, m in enumerate(self.models)]
            for j, mesh in enumerate(self.meshes or []):
                for k, mm in enumerate(mesh.models):
                    tp.append((f"meshes.{j}.models.{k}", mm.name, mm.tensor_parallel or 1))
            for key, name, degree in tp:
                if degree > 1:
                    raise ValueError(
                        f"{key}: {name} has tensor_parallel={degree}, which needs worker "
                        "processes: set engine.executor: mps"
                    )
        if self.meshes is not None:
            self._check_meshes(self.models, self.meshes)
            for mesh in self.meshes:
                shares = sum(m.kv_share or 0.0 for m in mesh.models)
                if shares > 1.0 + 1e-9:
                    raise ValueError(
                        f"mesh {mesh.name!r}: kv_share adds up to {shares:g}, over the whole pool"
                    )
                pool = mesh.kv_pool_bytes
                if pool is not None and pool < self.engine.block_bytes:
                    raise ValueError(
                        f"mesh {mesh.name!r}: kv_pool_bytes ({pool}) holds no block of "
                        f"block_bytes ({self.engine.block_bytes})"
                    )
        return self

    @staticmethod
    def _check_meshes(models: list[ModelEntry], meshes: list[Mesh]) -> None:
        names = [m.name for m in models]
        mesh_names = [m.name for m in meshes]
        dup = sorted({n for n in mesh_names if mesh_names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate mesh names: {', '.join(dup)}")
        owner: dict[tuple[int, int], str] = {}
        for mesh in meshes:
            unknown = [m.name for m in mesh.models if m.name not in names]
            if unknown:
                raise ValueError(f"mesh {mesh.name!r} names unknown models: {', '.join(unknown)}")
            for gpu in mesh.gpus:
                other = owner.setdefault((mesh.node, gpu), mesh.name)
                if other != mesh.name:
                    raise ValueError(
                        f"meshes {other!r} and {mesh.name!r} both claim GPU {gpu} of node "
                        f"{mesh.node}"
                    )
        tp = {m.name: m.tensor_parallel for m in models}
        for mesh in meshes:
            for mm in mesh.models:
                if mm.tensor_parallel is None and tp[mm.name] > len(mesh.gpus):
                    raise ValueError(
                        f"mesh {mesh.name!r}: {mm.name} has tensor_parallel={tp[mm.name]} "
                        f"but the mesh has {len(mesh.gpus)} GPUs"
                    )
        placed = {m.name for mesh in meshes for m in mesh.models}
        unplaced = [n for n in names if n not in placed]
        if unplaced:
            raise ValueError(f"no mesh serves {', '.join(unplaced)}")

    def model(self, name: str) -> ModelEntry:
        return next(m for m in self.models if m.name == name)

    def mesh(self, name: str) -> Mesh:
        """The mesh called `name`; KeyError if the config has no such mesh."""
        for mesh in self.meshes or []:
            if mesh.name == name:
                return mesh
        raise KeyError(f"no mesh {name!r}")

    def for_mesh(self, mesh: Mesh | str) -> MuxConfig:
        """The config of the one engine that serves `mesh`: its models, with the plan's
        tensor-parallel degree, SM shares, rate and KV share, and the mesh's pool size."""
        if isinstance(mesh, str):
            mesh = self.mesh(mesh)
        models = []
        for m in mesh.models:
            entry = self.model(m.name)
            update: dict[str, object] = {"kv_share": m.kv_share}
            if m.tensor_parallel is not None:
                update["tensor_parallel"] = m.tensor_parallel
            if m.sm_share is not None:
                update["sm_share"] = m.sm_share
            if m.rate:  # a plan's 0 (nothing expected) keeps the model's weight for its quota
                update["rate"] = m.rate
            if m.initial_state is not None:
                update["initial_state"] = m.initial_state
            models.append(entry.model_copy(update=update))
        engine = self.engine
        if mesh.kv_pool_bytes is not None:
            engine = engine.model_copy(update={"kv_pool_bytes": mesh.kv_pool_bytes})
        if mesh.weights_budget_bytes is not None:
            residency = engine.residency.model_copy(
                update={"weights_budget_bytes": mesh.weights_budget_bytes}
            )
            engine = engine.model_copy(update={"residency": residency})
        return MuxConfig(models=models, engine=engine, meshes=None)


def load_config(path: str | Path) -> MuxConfig:
    """Read and validate a YAML config; errors name the file and the offending key."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: no such config file") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{p}: is a directory, not a config file (YAML)") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file: {e.reason} at byte {e.start}") from e
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
        msg = err["msg"].removeprefix("Value error, ")  # our own validators' words, as written
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def dump_config(config: MuxConfig, path: str | Path) -> None:
    """Write a config (or plan) that `load_config` reads back unchanged."""
    data = config.model_dump(mode="json", exclude_none=True)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
