"""Run the app on an event loop of its own, in a thread: for tests, benchmarks and notebooks.

`muxserve serve` does not use this (it owns the main thread and its signals).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from muxserve.server.connection import AppRunner

T = TypeVar("T")


class BackgroundServer:
    """Serves `app` on 127.0.0.1 (a free port unless given) from a daemon thread.

    `with BackgroundServer(app) as url: ...` — the url is `http://127.0.0.1:PORT`. Leaving the
    block runs the app's shutdown and cleanup on its own loop, then joins the thread.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.sock = socket.create_server((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="muxserve-http", daemon=True)

    def start(self) -> str:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError("the server did not start") from self._error
        return self.url

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        runner = AppRunner(self.app, handler_cancellation=True, access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, self.sock).start())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the server's event loop (where the app's client lives) from another
        thread, and return its result (or raise its error); TimeoutError after `timeout` s."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
