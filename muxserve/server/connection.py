"""The HTTP connection under the app: malformed requests answered in the OpenAI shape, and the
runner every way of serving uses (`muxserve serve`, `BackgroundServer`, the tests).

aiohttp answers a request it cannot parse (a bad chunk size, an oversized header line, a
`Content-Encoding` it cannot decode) itself, before any middleware runs: in plain text, with
its own wording (which may name a Python package), and with a traceback in the log. Its one
seam for that answer is `RequestHandler.handle_error`, so the runner here builds its server
with a handler that overrides it: one log line, `{"error": {...}}` as every other error, and
the status counted where the app keeps its metrics (`ON_PROTOCOL_ERROR`), since no
middleware sees these requests.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.web_request import BaseRequest

from muxserve.server.responses import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

MAX_REASON = 200  # characters of a parser's message kept in the answer
# the app's callback for the status of a request aiohttp could not parse (its metrics)
ON_PROTOCOL_ERROR: web.AppKey[Callable[[int], None]] = web.AppKey("on_protocol_error")


def describe_protocol_error(exc: BaseException | None, message: str | None) -> tuple[int, str]:
    """The status and a client-facing message for a request aiohttp could not parse.

    The message never echoes the request's bytes back, nor names a package to install.
    """
    if isinstance(exc, ContentEncodingError):
        return 415, (
            "the body's Content-Encoding cannot be decoded here; send it uncompressed, or "
            "gzip- or deflate-compressed"
        )
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the limit"
        return 400, f"malformed HTTP request: a request line or header is over {limit} bytes"
    text = exc.message if isinstance(exc, HttpProcessingError) else (message or "")
    reason = str(text).strip().splitlines()[0] if str(text).strip() else ""
    reason = reason.split(": b'")[0].split(': b"')[0].rstrip(":. ")[:MAX_REASON]
    return 400, f"malformed HTTP request: {reason or 'cannot parse it'}"


class OpenAIRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering unparsable requests as the app answers errors."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """One log line (a traceback only for a 500: a bug) and the OpenAI error body;
        the connection is closed after it, as aiohttp does."""
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        status, text = describe_protocol_error(exc, message)
        log.warning("%d to %s: %s", status, request.remote, text)
        on_error = cast("_Server", self._manager).on_protocol_error
        if on_error is not None:
            on_error(status)
        if request.writer.output_size > 0:  # an answer is under way: nothing more can be said
            raise ConnectionError("a response was sent already; closing the connection")
        code = "unsupported_content_encoding" if status == 415 else "malformed_request"
        body = ErrorResponse(error=ErrorInfo(message=text, type="invalid_request_error", code=code))
        resp = web.Response(
            status=status, body=body.model_dump_json(), content_type="application/json"
        )
        resp.force_close()
        return resp


class _Server(web.Server):
    """aiohttp's server, with `OpenAIRequestHandler` for each connection."""

    on_protocol_error: Callable[[int], None] | None = None

    def __call__(self) -> web.RequestHandler:
        return OpenAIRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer malformed requests in the OpenAI shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        ours = _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
        ours.on_protocol_error = self.app.get(ON_PROTOCOL_ERROR)
        return ours


def serve_forever(
    app: web.Application, sock: socket.socket, shutdown_timeout: float, **kwargs: Any
) -> None:
    """Serve `app` on `sock` until SIGINT or SIGTERM, then stop it: the listening socket
    first, then the app's shutdown (in-flight requests get their grace), then its cleanup.
    A client that goes away cancels its handler (which aborts its request).

    `kwargs` go to the runner (`access_log=None` turns the access log off).
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # from the start: a signal while the
            loop.add_signal_handler(sig, stop.set)  # engines load stops as cleanly
        runner = AppRunner(
            app, shutdown_timeout=shutdown_timeout, handler_cancellation=True, **kwargs
        )
        try:
            await runner.setup()
            if not stop.is_set():
                await web.SockSite(runner, sock).start()
                await stop.wait()
        finally:
            await runner.cleanup()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(main())
