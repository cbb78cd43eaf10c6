"""What a router and a mesh engine say to each other: one dataclass per message.

Router to mesh: `AddRequest`, `Abort`, `StatsQuery`, `Ping`, `Sleep`, `Wake`, `AddModel`,
`RemoveModel`. Mesh to router: `MeshInfo` once after the handshake, then `Added` or `Refused`
for each `AddRequest`, `Output` as requests produce text, `StatsReply`, `Pong`, a
`SleepReply` / `WakeReply` for each `Sleep` / `Wake`, and a `ModelSetReply` for each
`AddModel` / `RemoveModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from muxserve.client.protocol import MeshStats, ModelState
from muxserve.config import ModelEntry
from muxserve.output_processor import RequestOutput
from muxserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class ModelLimits:
    """What the engine decided for one model (the router tokenizes and checks with these)."""

    dtype: str
    max_model_len: int


@dataclass(frozen=True)
class MeshInfo:
    """The mesh introduces itself: which process, on which host, serving what."""

    mesh: str
    pid: int
    node: str
    models: dict[str, ModelLimits]
    states: dict[str, ModelState] = field(default_factory=dict)  # at the handshake


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    model: str
    prompt: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Added:
    request_id: str


@dataclass(frozen=True)
class Refused:
    """The engine refused the request; `kind` names the RequestError subclass to raise
    (`error` carries a `ModelDoesNotFitError`'s fields: it is not a RequestError)."""

    request_id: str
    kind: str
    message: str
    param: str | None
    retry_after: int = 1  # a QueueFullError's
    error: ModelOpError | None = None


@dataclass(frozen=True)
class Output:
    output: RequestOutput


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class StatsQuery:
    seq: int


@dataclass(frozen=True)
class StatsReply:
    seq: int
    stats: MeshStats


@dataclass(frozen=True)
class Ping:
    seq: int


@dataclass(frozen=True)
class Pong:
    seq: int
    engine_running: bool  # the engine's loop is alive (the process answering is not enough)
    degraded: dict[str, str]  # models whose workers restart, and why
    states: dict[str, ModelState] = field(default_factory=dict)  # every model's, now


@dataclass(frozen=True)
class Sleep:
    seq: int
    model: str
    level: int


@dataclass(frozen=True)
class Wake:
    seq: int
    model: str


@dataclass(frozen=True)
class AddModel:
    """Serve one more model: `entry` is its config entry, as the router's config has it. The
    mesh adds it asleep and, with `wake`, wakes it (within its weights budget); a wake that
    fails takes it off again, so a refused model leaves the mesh as it was."""

    seq: int
    entry: ModelEntry
    wake: bool = True


@dataclass(frozen=True)
class RemoveModel:
    """Stop serving `model`: it must be drained (the mesh puts it to sleep, then removes it)."""

    seq: int
    model: str


@dataclass(frozen=True)
class ModelSetReply:
    """The answer to `AddModel` / `RemoveModel`: the added model's limits, the wake's seconds."""

    seq: int
    limits: ModelLimits | None = None
    seconds: float = 0.0
    error: ModelOpError | None = None
    states: dict[str, ModelState] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelOpError:
    """Why a `Sleep`, `Wake`, `AddModel` or `RemoveModel` failed, enough to raise the
    engine's exception again here.

    `kind` names the exception class; a `ModelDoesNotFitError`'s fields come along.
    """

    kind: str
    message: str
    model: str = ""  # the model the exception names
    needed_bytes: int = 0
    free_bytes: int = 0
    held_by: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0  # a ModelBusyError's


@dataclass(frozen=True)
class SleepReply:
    seq: int
    error: ModelOpError | None = None
    states: dict[str, ModelState] = field(default_factory=dict)


@dataclass(frozen=True)
class WakeReply:
    seq: int
    seconds: float = 0.0  # the wake took (0.0: awake already)
    error: ModelOpError | None = None
    states: dict[str, ModelState] = field(default_factory=dict)


def op_error(e: Exception) -> ModelOpError:
    """A failed `Sleep` / `Wake` as it travels."""
    from muxserve.errors import ModelBusyError, ModelDoesNotFitError

    kind = type(e).__name__
    if isinstance(e, ModelDoesNotFitError):
        return ModelOpError(kind, str(e), e.model, e.needed_bytes, e.free_bytes, e.held_by)
    if isinstance(e, ModelBusyError):
        return ModelOpError(kind, str(e), e.model, in_flight=e.in_flight)
    return ModelOpError(kind, str(e))


def op_exception(err: ModelOpError, model: str, served: list[str], mesh: str) -> Exception:
    """The engine's exception again, on the router's side."""
    from muxserve import errors

    if err.kind == "ModelDoesNotFitError":
        return errors.ModelDoesNotFitError(model, err.needed_bytes, err.free_bytes, err.held_by)
    if err.kind == "ModelBusyError":
        return errors.ModelBusyError(model, err.in_flight)
    if err.kind == "UnknownModelError":
        return errors.UnknownModelError(model, served)
    if err.kind == "ValueError":
        return ValueError(err.message)
    return errors.MeshUnavailableError(f"mesh {mesh!r}: {err.kind}: {err.message}", mesh)


def raise_op_error(err: ModelOpError, model: str, served: list[str], mesh: str) -> None:
    """Raise `op_exception`'s exception."""
    raise op_exception(err, model, served, mesh)
