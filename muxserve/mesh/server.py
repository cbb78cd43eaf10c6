"""`MeshServer`: one mesh's engine behind a socket that routers connect to.

The engine's loop runs in its own thread; this event loop only moves messages. Each
connection owns the requests it added: when it closes (the router went away or restarts),
they are aborted, so their KV blocks are freed and nothing waits for a reader that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from muxserve.client.in_process import mesh_stats
from muxserve.engine import MuxEngine
from muxserve.errors import ModelDoesNotFitError, QueueFullError, RequestError
from muxserve.mesh import wire
from muxserve.mesh.messages import (
    Abort,
    Added,
    AddModel,
    AddRequest,
    MeshInfo,
    ModelLimits,
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
    op_error,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0  # a peer that does not answer the challenge by then is dropped


class MeshServer:
    """Serves `engine` (already started) to routers holding `token`."""

    def __init__(self, name: str, engine: MuxEngine, token: str) -> None:
        self.name = name
        self.engine = engine
        self.token = token
        self._server: asyncio.Server | None = None
        self._node = socket.gethostname()
        self._connections: set[asyncio.Task[None]] = set()

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Start accepting connections; returns the address bound (port 0: a free one)."""
        self._server = await asyncio.start_server(self._serve, host, port)
        addr = self._server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def close(self) -> None:
        """Stop accepting, close every connection (aborting its requests)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await asyncio.wait_for(wire.verify(reader, writer, self.token), HANDSHAKE_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
            log.warning("mesh %s: refused a connection: %s", self.name, e or type(e).__name__)
            self._connections.discard(task)
            writer.close()
            return
        conn = _Connection(self, writer)
        try:
            wire.send(writer, self.info())
            while True:
                conn.handle(await wire.receive(reader))
        except (OSError, asyncio.IncompleteReadError, EOFError):
            pass  # the router went away
        except asyncio.CancelledError:
            pass  # `close()`: end quietly (asyncio's stream callback logs a cancelled task)
        finally:
            conn.close()
            self._connections.discard(task)
            writer.close()

    def info(self) -> MeshInfo:
        """What the mesh serves now (models may have been added or removed since it started)."""
        models = dict(self.engine.models)
        return MeshInfo(
            self.name,
            os.getpid(),
            self._node,
            {n: ModelLimits(m.dtype, m.max_model_len) for n, m in models.items()},
            self.engine.model_states(),
        )


class _Connection:
    """One router's session: the requests it added, each with a task forwarding its outputs."""

    def __init__(self, server: MeshServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.engine = server.engine
        self.writer = writer
        self.forwards: dict[str, asyncio.Task[None]] = {}
        self.ops: set[asyncio.Task[None]] = set()  # sleeps and wakes under way

    def handle(self, msg: object) -> None:
        if isinstance(msg, AddRequest):
            self.add(msg)
        elif isinstance(msg, Abort):
            task = self.forwards.pop(msg.request_id, None)
            if task is not None:
                task.cancel()
                self.engine.abort(msg.request_id)
        elif isinstance(msg, StatsQuery):
            wire.send(self.writer, StatsReply(msg.seq, mesh_stats(self.engine, self.server.name)))
        elif isinstance(msg, Ping):
            wire.send(
                self.writer,
                Pong(
                    msg.seq,
                    self.engine.is_running,
                    self.engine.degraded(),
                    self.engine.model_states(),
                ),
            )
        elif isinstance(msg, Sleep | Wake | AddModel | RemoveModel):
            op = self.sleep_or_wake(msg) if isinstance(msg, Sleep | Wake) else self.reshape(msg)
            task = asyncio.create_task(op)
            self.ops.add(task)
            task.add_done_callback(self.ops.discard)
        else:
            raise ConnectionError(f"unexpected message {type(msg).__name__}")

    def add(self, msg: AddRequest) -> None:
        rid = msg.request_id
        if rid in self.forwards:
            wire.send(self.writer, Refused(rid, "RequestError", f"duplicate id {rid!r}", None))
            return
        try:
            self.engine.add_request(msg.model, msg.prompt, msg.params, rid)
        except RequestError as e:
            retry = e.retry_after if isinstance(e, QueueFullError) else 1
            wire.send(self.writer, Refused(rid, type(e).__name__, str(e), e.param, retry))
            return
        except ValueError as e:  # e.g. an id another connection uses: the request's fault
            wire.send(self.writer, Refused(rid, "RequestError", str(e), None))
            return
        except ModelDoesNotFitError as e:  # a 503 that keeps its numbers on the router's side
            wire.send(self.writer, Refused(rid, type(e).__name__, str(e), "model", 1, op_error(e)))
            return
        except Exception as e:  # the engine stopped, or a bug: the router answers 503/500
            wire.send(self.writer, Refused(rid, type(e).__name__, str(e), None))
            return
        wire.send(self.writer, Added(rid))
        self.forwards[rid] = asyncio.create_task(self.forward(rid))

    async def forward(self, rid: str) -> None:
        try:
            async for out in self.engine.stream(rid):
                wire.send(self.writer, Output(out))
                await self.writer.drain()  # a router that stops reading slows this request only
        except (OSError, KeyError):
            pass
        finally:
            self.forwards.pop(rid, None)

    async def sleep_or_wake(self, msg: Sleep | Wake) -> None:
        """Run it in a thread (the weights move meanwhile), then answer."""
        reply: SleepReply | WakeReply
        try:
            if isinstance(msg, Sleep):
                await asyncio.to_thread(self.engine.sleep, msg.model, msg.level)
                reply = SleepReply(msg.seq, states=self.engine.model_states())
            else:
                took = await asyncio.to_thread(self.engine.wake, msg.model)
                reply = WakeReply(msg.seq, took, states=self.engine.model_states())
        except Exception as e:
            states = self.engine.model_states()
            err = op_error(e)
            if isinstance(msg, Sleep):
                reply = SleepReply(msg.seq, err, states)
            else:
                reply = WakeReply(msg.seq, 0.0, err, states)
        with contextlib.suppress(OSError, RuntimeError):  # the router went away meanwhile
            wire.send(self.writer, reply)

    async def reshape(self, msg: AddModel | RemoveModel) -> None:
        """Add a model (asleep, then woken) or remove a drained one, in a thread; answer."""
        reply: ModelSetReply
        try:
            if isinstance(msg, AddModel):
                served = await asyncio.to_thread(self.engine.add_model, msg.entry)
                took = 0.0
                if msg.wake:
                    try:
                        took = await asyncio.to_thread(self.engine.wake, served.name)
                    except BaseException:  # it does not fit, or failed to load: off again
                        with contextlib.suppress(Exception):
                            await asyncio.to_thread(self.engine.remove_model, served.name)
                        raise
                limits = ModelLimits(served.dtype, served.max_model_len)
                reply = ModelSetReply(msg.seq, limits, took, states=self.engine.model_states())
            else:
                await asyncio.to_thread(self._drop, msg.model)
                reply = ModelSetReply(msg.seq, states=self.engine.model_states())
        except Exception as e:
            reply = ModelSetReply(msg.seq, error=op_error(e), states=self.engine.model_states())
        with contextlib.suppress(OSError, RuntimeError):  # the router went away meanwhile
            wire.send(self.writer, reply)

    def _drop(self, model: str) -> None:
        """Sleep (dropping the weights) and remove `model`; ModelBusyError while it has
        requests."""
        self.engine.sleep(model, 2)
        self.engine.remove_model(model)

    def close(self) -> None:
        for task in list(self.ops):
            task.cancel()  # the thread finishes its move; nobody is left to answer
        for rid, task in list(self.forwards.items()):
            task.cancel()
            self.engine.abort(rid)
        self.forwards.clear()
