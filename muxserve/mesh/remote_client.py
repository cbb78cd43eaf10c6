"""`RemoteEngineClient`: one connection from the router to one mesh engine.

Requests are multiplexed over the connection: each `AddRequest` waits for its `Added` or
`Refused`, and outputs go to the request's queue as they arrive, with no batching. When the
connection is lost every waiting call and open stream ends with `MeshUnavailableError`
naming the mesh, so clients get a 503 at once rather than a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from muxserve import errors
from muxserve.client.protocol import MeshStats, ModelState
from muxserve.config import ModelEntry
from muxserve.errors import MeshUnavailableError, RequestError
from muxserve.mesh import wire
from muxserve.mesh.messages import (
    Abort,
    Added,
    AddModel,
    AddRequest,
    MeshInfo,
    ModelOpError,
    ModelSetReply,
    Output,
    Ping,
    Pong,
    Refused,
    RemoveModel,
    Sleep,
    SleepReply,
    StatsQuery,
    StatsReply,
    Wake,
    WakeReply,
    op_exception,
    raise_op_error,
)
from muxserve.mesh.runtime import Endpoint
from muxserve.output_processor import RequestOutput
from muxserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
SLEEP_WAKE_TIMEOUT_S = 600.0  # a wake reloading a large checkpoint, at most

_Item = RequestOutput | BaseException


class RemoteEngineClient:
    """The router's handle on mesh `name` at `endpoint` (reconnect with `connect`)."""

    def __init__(self, name: str, token: str) -> None:
        self.name = name
        self.token = token
        self.info: MeshInfo | None = None
        self.endpoint: Endpoint | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._closed.set()
        self._added: dict[str, asyncio.Future[None]] = {}
        self._streams: dict[str, asyncio.Queue[_Item]] = {}
        self._replies: dict[int, asyncio.Future[object]] = {}
        self._seq = itertools.count()
        self.lost_reason = "not connected yet"
        self.degraded: dict[str, str] = {}  # the mesh's models that do not serve, at last ping
        self.states: dict[str, ModelState] = {}  # its models' states, as last reported

    @property
    def connected(self) -> bool:
        return not self._closed.is_set()

    @property
    def outstanding(self) -> int:
        """Requests added and not yet finished: the router's load measure."""
        return len(self._streams)

    async def connect(self, endpoint: Endpoint, timeout: float = CONNECT_TIMEOUT_S) -> MeshInfo:
        """Connect and handshake; returns what the mesh says of itself."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port), timeout
        )
        try:
            await asyncio.wait_for(wire.prove(reader, writer, self.token), timeout)
            info = await asyncio.wait_for(wire.receive(reader), timeout)
        except asyncio.IncompleteReadError as e:
            writer.close()
            raise wire.HandshakeError(
                f"mesh {self.name!r} closed the connection during the handshake "
                "(not our mesh, a wrong token, or it is stopping)"
            ) from e
        except BaseException:
            writer.close()
            raise
        if not isinstance(info, MeshInfo):
            writer.close()
            raise ConnectionError(f"mesh {self.name}: expected MeshInfo, got {type(info).__name__}")
        self.info, self.endpoint, self._writer = info, endpoint, writer
        self.states = dict(info.states)
        # what the last connection left (streams whose readers never came for their error)
        self._streams, self._added, self._replies = {}, {}, {}
        self._closed.clear()
        self._reader_task = asyncio.create_task(self._read(reader), name=f"mesh-{self.name}")
        return info

    async def wait_closed(self) -> None:
        """Returns once the connection is lost (or was never made)."""
        await self._closed.wait()

    async def close(self) -> None:
        """Drop the connection: the mesh aborts every request this client added."""
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._lost("the router closed the connection")

    # ---- requests --------------------------------------------------------------------------
    def _unavailable(self) -> MeshUnavailableError:
        return MeshUnavailableError(
            f"mesh {self.name!r} is unavailable: {self.lost_reason}", self.name
        )

    async def add_request(
        self, model: str, prompt: list[int], params: SamplingParams, request_id: str
    ) -> str:
        if not self.connected or self._writer is None:
            raise self._unavailable()
        if request_id in self._streams:
            raise RequestError(f"a request with id {request_id!r} is already running", None)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._added[request_id] = done
        self._streams[request_id] = asyncio.Queue()
        wire.send(self._writer, AddRequest(request_id, model, prompt, params))
        try:
            await done
        except BaseException as e:
            self._streams.pop(request_id, None)
            if not isinstance(e, RequestError | MeshUnavailableError) and self._writer is not None:
                # cancelled (the client went away), maybe after the mesh started it: stop it
                # there; messages keep their order, and the mesh ignores ids it does not know
                with contextlib.suppress(RuntimeError, OSError):
                    wire.send(self._writer, Abort(request_id))
            raise
        finally:
            self._added.pop(request_id, None)
        return request_id

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        queue = self._streams.get(request_id)
        if queue is None:
            raise KeyError(f"unknown request {request_id!r} (or its outputs were read already)")
        ended = False  # the mesh said the last word (a finished output, or the connection's end)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                ended = item.finished
                yield item
                if item.finished:
                    return
        finally:
            if not ended:  # the reader went away (cancelled, closed): stop it on the mesh too
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """As the engine's abort: a reader already inside `stream()` gets a last "abort"
        output now, and the mesh frees the request's blocks when its Abort arrives."""
        queue = self._streams.pop(request_id, None)
        if queue is None:
            return
        queue.put_nowait(_aborted(request_id))
        if self._writer is not None:
            with contextlib.suppress(RuntimeError, OSError):
                wire.send(self._writer, Abort(request_id))

    async def stats(self, timeout: float) -> MeshStats:
        reply = await self._ask(StatsQuery(next(self._seq)), timeout)
        assert isinstance(reply, StatsReply)
        if reply.stats.states:
            self.states = dict(reply.stats.states)
        return reply.stats

    async def sleep(
        self, model: str, level: int = 1, timeout: float = SLEEP_WAKE_TIMEOUT_S
    ) -> None:
        """Put `model` to sleep on this mesh (see `EngineClient.sleep`)."""
        reply = await self._ask(Sleep(next(self._seq), model, level), timeout)
        assert isinstance(reply, SleepReply)
        self._model_op_done(model, reply.states, reply.error)

    async def wake(self, model: str, timeout: float = SLEEP_WAKE_TIMEOUT_S) -> float:
        """Wake `model` on this mesh; the seconds it took (see `EngineClient.wake`)."""
        reply = await self._ask(Wake(next(self._seq), model), timeout)
        assert isinstance(reply, WakeReply)
        self._model_op_done(model, reply.states, reply.error)
        return reply.seconds

    async def add_model(
        self, entry: ModelEntry, wake: bool = True, timeout: float = SLEEP_WAKE_TIMEOUT_S
    ) -> float:
        """Serve `entry`'s model on this mesh too, asleep, then (with `wake`) woken; the wake's
        seconds. ModelDoesNotFitError where it does not fit (the mesh is left as it was)."""
        reply = await self._ask(AddModel(next(self._seq), entry, wake), timeout)
        assert isinstance(reply, ModelSetReply)
        self._model_op_done(entry.name, reply.states, reply.error)
        if self.info is not None and reply.limits is not None:
            self.info = replace(self.info, models={**self.info.models, entry.name: reply.limits})
        return reply.seconds

    async def remove_model(self, model: str, timeout: float = SLEEP_WAKE_TIMEOUT_S) -> None:
        """Stop serving `model` on this mesh (drained first: ModelBusyError otherwise)."""
        reply = await self._ask(RemoveModel(next(self._seq), model), timeout)
        assert isinstance(reply, ModelSetReply)
        self._model_op_done(model, reply.states, reply.error)
        if self.info is not None:
            models = {n: lim for n, lim in self.info.models.items() if n != model}
            self.info = replace(self.info, models=models)
        self.states.pop(model, None)

    def model_states(self) -> dict[str, ModelState]:
        """As the mesh last reported them (the handshake, a ping, stats, a sleep or wake)."""
        return dict(self.states)

    def _model_op_done(
        self, model: str, states: dict[str, ModelState], error: ModelOpError | None
    ) -> None:
        if states:
            self.states = dict(states)
        if error is not None:
            served = list(self.info.models) if self.info is not None else []
            raise_op_error(error, model, served, self.name)

    async def ping(self, timeout: float) -> bool:
        """Whether the mesh's engine loop runs; MeshUnavailableError or TimeoutError if the
        mesh does not answer."""
        reply = await self._ask(Ping(next(self._seq)), timeout)
        assert isinstance(reply, Pong)
        self.degraded = reply.degraded
        if reply.states:
            self.states = dict(reply.states)
        return reply.engine_running

    async def _ask(
        self, msg: StatsQuery | Ping | Sleep | Wake | AddModel | RemoveModel, timeout: float
    ) -> object:
        if not self.connected or self._writer is None:
            raise self._unavailable()
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._replies[msg.seq] = fut
        try:
            wire.send(self._writer, msg)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(msg.seq, None)

    # ---- the reader ------------------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        reason = "the mesh closed the connection"
        try:
            while True:
                self._dispatch(await wire.receive(reader))
        except asyncio.IncompleteReadError:
            reason = "the connection closed (the mesh's process ended or hung up)"
        except (ConnectionError, OSError) as e:
            reason = f"connection lost ({type(e).__name__}: {e})"
        except asyncio.CancelledError:
            reason = "the router closed the connection"
            raise
        finally:
            self._lost(reason)

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, Output):
            queue = self._streams.get(msg.output.request_id)
            if queue is not None:  # else: aborted here, its last outputs are of no use
                queue.put_nowait(msg.output)
        elif isinstance(msg, Added):
            fut = self._added.get(msg.request_id)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(msg, Refused):
            fut = self._added.get(msg.request_id)
            if fut is not None and not fut.done():
                fut.set_exception(_refusal(msg, self.name))
        elif isinstance(msg, StatsReply | Pong | SleepReply | WakeReply | ModelSetReply):
            reply = self._replies.get(msg.seq)
            if reply is not None and not reply.done():
                reply.set_result(msg)
        else:
            log.warning("mesh %s sent an unexpected %s", self.name, type(msg).__name__)

    def _lost(self, reason: str) -> None:
        """Fail everything that waits on this connection; idempotent."""
        if self._closed.is_set():
            return
        self.lost_reason = reason
        self._closed.set()
        self._writer = None
        err = self._unavailable()
        for added in self._added.values():
            if not added.done():
                added.set_exception(err)
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(err)
        for queue in self._streams.values():
            queue.put_nowait(err)
        # the streams stay until read: their readers take the error and remove them


def _aborted(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, "", "", (), (), True, "abort", 0, 0)


def _refusal(msg: Refused, mesh: str) -> Exception:
    """The engine's exception again, on this side: a RequestError subclass keeps its type (the
    HTTP layer maps it to 400/404/429); anything else means the mesh cannot serve (503)."""
    if msg.error is not None and msg.error.kind == "ModelDoesNotFitError":
        return op_exception(msg.error, msg.error.model, [], mesh)
    cls = getattr(errors, msg.kind, None)
    if isinstance(cls, type) and issubclass(cls, RequestError):
        if cls is errors.UnknownModelError:
            return RequestError(msg.message, msg.param)
        if cls is errors.QueueFullError:
            return errors.QueueFullError(msg.message, msg.param, msg.retry_after)
        try:
            return cls(msg.message, msg.param)
        except TypeError:
            return RequestError(msg.message, msg.param)
    return MeshUnavailableError(f"mesh {mesh!r} refused the request: {msg.message}", mesh)
