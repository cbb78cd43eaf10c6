"""Admin routes: put a model to sleep and wake it (`POST /v1/models/{model}/sleep|wake`).

Behind the API key like every /v1 route. Sleeping a model with requests in flight is refused
(409): drain it first; a wake that does not fit answers 503 naming the model and what holds
the memory.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from muxserve.client.protocol import ModelState
from muxserve.server.context import ServerContext, parse_body
from muxserve.server.errors import APIError


class SleepRequest(BaseModel):
    """The optional body of a sleep: level 1 keeps the weights in host memory, 2 drops them."""

    model_config = ConfigDict(extra="forbid")

    level: Literal[1, 2] = 1


class ModelStateResponse(BaseModel):
    """What a sleep or wake answers: the model's state after it, and the wake's seconds."""

    id: str
    object: Literal["model.state"] = "model.state"
    state: str
    wake_seconds: float | None = None


class AdminHandlers:
    """Sleep and wake, through the `EngineClient` (one engine here, or the router)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def _state(self, name: str) -> str:
        return self.ctx.client.model_states().get(name, ModelState.AWAKE).value

    async def sleep(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        self.ctx.model(name)  # 404 for an unknown model, before the body is read
        body = (
            SleepRequest()
            if not request.can_read_body
            else await parse_body(request, SleepRequest, self.ctx.settings)
        )
        try:
            await self.ctx.client.sleep(name, body.level)
        except ValueError as e:  # an executor that cannot sleep a model
            raise APIError(400, str(e), param="model") from None
        except TimeoutError as e:
            raise APIError(503, str(e), "server_error", code="model_busy") from None
        return _json(ModelStateResponse(id=name, state=self._state(name)))

    async def wake(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        self.ctx.model(name)
        try:
            took = await self.ctx.client.wake(name)
        except ValueError as e:
            raise APIError(400, str(e), param="model") from None
        except TimeoutError as e:
            raise APIError(503, str(e), "server_error", code="model_busy") from None
        return _json(ModelStateResponse(id=name, state=self._state(name), wake_seconds=took))


def _json(body: BaseModel) -> web.Response:
    return web.Response(body=body.model_dump_json(), content_type="application/json")
