"""Exception types: one per kind of failure, so callers (and the HTTP layer) can map them."""

from __future__ import annotations

import signal


def exit_cause(code: int | None) -> str:
    """How a process ended, from its exit code, for an error message: "signal SIGKILL",
    "exit code 3" (a signal Python does not name: "signal 70"; None: "no exit code")."""
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class MuxServeError(Exception):
    """Base of every error MuxServe raises on purpose."""


class ConfigError(MuxServeError, ValueError):
    """A configuration file is missing, malformed, or names an invalid value.

    The message names the file and the offending key.
    """


class CheckpointError(MuxServeError):
    """A Hugging Face checkpoint folder cannot be served (missing files or tensors)."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's `architectures` names a model family MuxServe does not implement."""


class RequestError(MuxServeError, ValueError):
    """A request that cannot be served as asked; nothing was allocated for it.

    `param` names the offending field where there is one (OpenAI's error `param`).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownModelError(RequestError):
    """The request names a model this engine does not serve."""

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(
            f"model {model!r} is not served here; served models: {', '.join(served)}", "model"
        )
        self.model = model


class EmptyPromptError(RequestError):
    """The prompt has no tokens."""


class PromptTooLongError(RequestError):
    """Prompt plus requested output exceed what the model (or the KV pool) can hold."""


class InvalidSamplingParamsError(RequestError):
    """A sampling parameter is out of range; `param` names it."""


class QueueFullError(RequestError):
    """A model's waiting queue is full, or would take too long; retry later (HTTP 429).

    `retry_after` is the seconds to wait (the queue's expected wait, at least 1).
    """

    def __init__(self, message: str, param: str | None = "model", retry_after: int = 1) -> None:
        super().__init__(message, param)
        self.retry_after = retry_after


class ModelDoesNotFitError(MuxServeError):
    """A sleeping model cannot wake: its weights do not fit in the device memory the awake
    models leave (HTTP 503). `held_by` is what holds that memory: model -> bytes."""

    def __init__(
        self, model: str, needed_bytes: int, free_bytes: int, held_by: dict[str, int]
    ) -> None:
        held = ", ".join(f"{m} {_mib(b)}" for m, b in sorted(held_by.items(), key=lambda x: -x[1]))
        super().__init__(
            f"model {model!r} does not fit: its weights need {_mib(needed_bytes)}, "
            f"{_mib(free_bytes)} is free; held by {held or 'nothing we know of'}"
        )
        self.model = model
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        self.held_by = dict(held_by)


class ModelBusyError(MuxServeError):
    """A model cannot be put to sleep now: it has requests waiting or running (HTTP 409)."""

    def __init__(self, model: str, in_flight: int) -> None:
        super().__init__(
            f"model {model!r} has {in_flight} request(s) in flight; "
            "drain it (route its requests elsewhere) and retry"
        )
        self.model = model
        self.in_flight = in_flight


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class EngineStoppedError(MuxServeError):
    """The engine's loop is not running (it was shut down, or it failed): nothing is served."""


class WorkerFailedError(MuxServeError):
    """The worker running a request's job failed; the request cannot complete."""


class MeshUnavailableError(MuxServeError):
    """The mesh that serves a request's model is down or restarting (HTTP 503); `mesh` names it.

    Other meshes keep serving; a restarted mesh takes requests again.
    """

    def __init__(self, message: str, mesh: str) -> None:
        super().__init__(message)
        self.mesh = mesh


class MeshStartError(MuxServeError):
    """A mesh of a plan could not be started (bad plan, no memory, a crash while loading)."""


class InsufficientMemoryError(MuxServeError):
    """The models leave a device no room for the KV pool; the message gives the numbers."""
