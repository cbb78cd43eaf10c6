"""Every failure as OpenAI's `{"error": {"message", "type", "param", "code"}}`, with its status.

| cause                                                | status | type / code                  |
| ---------------------------------------------------- | ------ | ---------------------------- |
| body not JSON, wrong types or values, prompt too long | 400    | invalid_request_error        |
| missing or wrong API key                             | 401    | ... / invalid_api_key        |
| unknown model; unknown route                         | 404    | ... / model_not_found, not_found |
| wrong method                                         | 405    | ... / method_not_allowed     |
| body not sent in time (`body_timeout`); then closed  | 408    | ... / request_timeout        |
| body over the size limit                             | 413    | ... / request_too_large      |
| the model's queue is full, or too slow to wait in    | 429    | rate_limit_error / queue_full |
| the engine failed the request; anything unexpected   | 500    | server_error                 |
| aborted because the server is stopping               | 503    | server_error / unavailable   |
| the model's mesh is down (named in the message)      | 503    | ... / mesh_unavailable       |
| sleep of a model with requests in flight             | 409    | ... / model_busy             |
| a wake that does not fit (names what holds memory)   | 503    | ... / model_does_not_fit     |
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import ValidationError

from muxserve.errors import (
    EngineStoppedError,
    MeshUnavailableError,
    ModelBusyError,
    ModelDoesNotFitError,
    QueueFullError,
    RequestError,
    UnknownModelError,
)
from muxserve.server.responses import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

OnResponse = Callable[[web.Request, int], None]

MAX_MESSAGE = 1000  # characters of an error message (validation errors can list many fields)
_HTTP_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


class APIError(Exception):
    """An error the server answers with `status` and the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int = 1,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message[:MAX_MESSAGE], type=type, param=param, code=code)
        self.retry_after = retry_after  # seconds, for a 429

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.status == 429 else None
        resp = web.Response(
            status=self.status,
            body=ErrorResponse(error=self.info).model_dump_json(),
            content_type="application/json",
            headers=headers,
        )
        if self.status == 408:  # the client is slow or stalled: not worth keeping
            resp.force_close()
        return resp


def from_request_error(e: RequestError) -> APIError:
    """The engine's refusals: unknown model 404, full queue 429, anything else 400."""
    if isinstance(e, UnknownModelError):
        return APIError(404, str(e), param=e.param, code="model_not_found")
    if isinstance(e, QueueFullError):  # Retry-After: the queue's expected wait
        return APIError(429, str(e), "rate_limit_error", e.param, "queue_full", e.retry_after)
    return APIError(400, str(e), param=e.param)


def from_validation_error(e: ValidationError) -> APIError:
    """A 400 whose message names each offending field and whose `param` is the first."""
    problems = []
    for err in e.errors(include_url=False, include_input=False):
        key = ".".join(str(x) for x in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(f"{key}: {msg}" if key else msg)
    first = e.errors(include_url=False, include_input=False)[0]["loc"] if e.error_count() else ()
    param = ".".join(str(x) for x in first) or None
    return APIError(400, "; ".join(problems[:8]), param=param)


def from_http_exception(e: web.HTTPException) -> APIError:
    """aiohttp's own errors (no such route, body too large) in the OpenAI shape."""
    if e.status == 413:
        message = f"the request body is too large ({e.text or 'over the limit'})"
    elif e.status == 404:
        message = "no such route; see GET /v1/models, POST /v1/completions, /v1/chat/completions"
    else:
        message = e.reason if not e.text or e.text.startswith(f"{e.status}:") else e.text
    return APIError(e.status, message, code=_HTTP_CODES.get(e.status))


def error_middleware(on_response: OnResponse | None = None) -> Middleware:
    """Turn every exception into an OpenAI-shaped error; an unexpected one is logged, and 500.

    `on_response(request, status)` sees every status (for metrics). A client that went away
    gets nothing: its connection is gone.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except (asyncio.CancelledError, ConnectionResetError):
            if on_response is not None:
                on_response(request, 499)  # nginx's "client closed request"
            raise
        except APIError as e:
            response = e.response()
        except RequestError as e:
            response = from_request_error(e).response()
        except ValidationError as e:
            response = from_validation_error(e).response()
        except EngineStoppedError as e:
            response = APIError(503, str(e), "server_error", code="engine_stopped").response()
        except MeshUnavailableError as e:
            response = APIError(503, str(e), "server_error", code="mesh_unavailable").response()
        except ModelDoesNotFitError as e:
            response = APIError(
                503, str(e), "server_error", "model", "model_does_not_fit"
            ).response()
        except ModelBusyError as e:
            response = APIError(409, str(e), param="model", code="model_busy").response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            response = from_http_exception(e).response()
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = APIError(500, "internal server error", "server_error").response()
        if on_response is not None:
            on_response(request, response.status)
        return response

    return middleware


def auth_middleware(api_key: str | None) -> Middleware:
    """With a key, every /v1 route needs `Authorization: Bearer <key>` (401 otherwise).

    The scheme is matched case-insensitively, as HTTP's auth schemes are (RFC 9110 11.1). An
    empty key is refused: it would mean no auth to whoever passed an unset variable.
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty; give a key, or None to serve without one")
    expected = (api_key or "").encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api_key and request.path.startswith("/v1"):
            scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
            got = token.strip().encode("utf-8", "replace")
            if scheme.lower() != "bearer" or not hmac.compare_digest(got, expected):
                raise APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
        return await handler(request)

    return middleware
