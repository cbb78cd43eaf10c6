"""What every handler is given: the engine, the metrics, the settings; and body parsing."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, get_args

from aiohttp import web
from pydantic import BaseModel

from muxserve.client.protocol import EngineClient
from muxserve.errors import UnknownModelError
from muxserve.served_model import ServedModel
from muxserve.server.errors import APIError
from muxserve.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from muxserve.server.generation import Generation

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

OFFLOAD_BYTES = 64 << 10  # bodies and prompts past this are parsed/tokenized in a thread


@dataclass(frozen=True)
class ServerSettings:
    """How the HTTP side behaves; the engines have their own config."""

    api_key: str | None = None  # None: no auth
    max_body_bytes: int = 4 << 20  # larger bodies get 413
    max_choices: int = 64  # prompts x n per request
    shutdown_grace: float = 5.0  # seconds in-flight requests get to finish when stopping
    # seconds a connection may take to send a request's headers, counted from its opening or
    # from the end of its previous answer (so also how long an idle keep-alive one is kept)
    header_timeout: float = 30.0
    body_timeout: float = 60.0  # seconds to send the whole body once the headers are in: 408
    # after an answer given before the body was read (413, 408), seconds the rest is read and
    # dropped before the connection closes, so a client still sending sees the answer
    linger: float = 10.0
    # unknown body fields: a 400 naming them (OpenAI's way, catches typos), or logged and
    # dropped (vLLM's way)
    ignore_unknown_fields: bool = False

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; give a key, or none to serve without one")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.linger >= 0:
            raise ValueError(f"linger must be >= 0, got {self.linger}")


@dataclass
class ServerContext:
    """The dependencies handlers are built with."""

    client: EngineClient  # whatever runs the models: one engine here, or a router over meshes
    metrics: ServerMetrics
    settings: ServerSettings
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models' `created`
    active: set[Generation] = field(default_factory=set)  # requests in flight, for shutdown

    def model(self, name: str) -> ServedModel:
        """The served model called `name`; UnknownModelError (404) otherwise."""
        served = self.client.models.get(name)
        if served is None:
            raise UnknownModelError(name, list(self.client.models))
        return served


CONTEXT = web.AppKey("muxserve_context", ServerContext)


async def offload(size: int, fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` here when the input is small, in a worker thread when it is large.

    Small inputs take microseconds, less than the thread hop; large ones would stall the
    event loop (and /health) for milliseconds.
    """
    if size <= OFFLOAD_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def parse_body(request: web.Request, model: type[M], settings: ServerSettings) -> M:
    """Read and validate a JSON body; 413 past `max_body_bytes`, 408 when it takes longer
    than `body_timeout`, ValidationError (400) if malformed.

    With `ignore_unknown_fields`, fields the model does not define (at any depth) are logged
    and dropped rather than refused.
    """
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        body = await asyncio.wait_for(request.read(), settings.body_timeout)
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {settings.body_timeout:g} s",
            code="request_timeout",
        ) from None
    if not settings.ignore_unknown_fields:
        return await offload(len(body), model.model_validate_json, body)
    return await offload(len(body), _validate_lenient, model, body)


def _validate_lenient(model: type[M], body: bytes) -> M:
    try:
        data = json.loads(body)
    except ValueError:
        return model.model_validate_json(body)  # the same 400 as without the flag
    dropped: list[str] = []
    data = _drop_unknown(model, data, "", dropped)
    if dropped:
        log.warning("ignored unknown fields: %s", ", ".join(dropped))
    return model.model_validate(data)


def _drop_unknown(model: type[BaseModel], data: Any, path: str, dropped: list[str]) -> Any:
    """`data` without the keys `model` forbids, recursing into fields of strict models."""
    if not isinstance(data, dict) or model.model_config.get("extra") != "forbid":
        return data
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    out = {}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            dropped.append(path + key)
            continue
        sub = _model_in(field.annotation)
        if sub is not None and isinstance(value, dict):
            value = _drop_unknown(sub, value, f"{path}{key}.", dropped)
        elif sub is not None and isinstance(value, list):
            value = [
                _drop_unknown(sub, v, f"{path}{key}[{i}].", dropped) for i, v in enumerate(value)
            ]
        out[key] = value
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X | None` or `list[X]`, if one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
