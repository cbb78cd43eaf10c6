"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info; and
GET /version.

`model` may be left out where the server serves one model (lm-evaluation-harness's remote
tokenizer sends none); with several it names the one whose tokenizer to use.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import Field

from muxserve import __version__
from muxserve.errors import InvalidSamplingParamsError
from muxserve.served_model import ServedModel
from muxserve.server.context import ServerContext, offload, parse_body
from muxserve.server.errors import APIError
from muxserve.server.logprobs import token_text
from muxserve.server.protocol import ChatMessage
from muxserve.server.responses import DetokenizeResponse, TokenizeResponse
from muxserve.server.strict import Strict
from muxserve.server.tools import Tool


class TokenizeRequest(Strict):
    """POST /tokenize (vLLM): a prompt, or chat messages rendered with the template."""

    model: str | None = Field(None, min_length=1)  # optional where one model is served
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    tools: list[Tool] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None  # ignored

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidSamplingParamsError("send either prompt or messages", "prompt")


class DetokenizeRequest(Strict):
    """POST /detokenize (vLLM)."""

    model: str | None = Field(None, min_length=1)  # optional where one model is served
    tokens: list[int]


class TokenizerHandlers:
    """/tokenize, /detokenize, /tokenizer_info and /version over the served tokenizers."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def _served(self, model: str | None) -> ServedModel:
        if model is not None:
            return self.ctx.model(model)
        names = list(self.ctx.client.models)
        if len(names) != 1:
            raise APIError(
                400, f"model is required: this server serves {', '.join(names)}", param="model"
            )
        return self.ctx.model(names[0])

    async def tokenize(self, request: web.Request) -> web.Response:
        req = await parse_body(request, TokenizeRequest, self.ctx.settings)
        req.check()
        served = self._served(req.model)
        tok, size = served.tokenizer, request.content_length or 0
        if req.messages is not None:
            messages = [m.for_template() for m in req.messages]
            text = await offload(
                size,
                lambda: tok.apply_chat_template(
                    messages,
                    add_generation_prompt=req.add_generation_prompt,
                    tools=[t.model_dump(exclude_none=True) for t in req.tools]
                    if req.tools
                    else None,
                    chat_template=req.chat_template,
                    extra=req.chat_template_kwargs,
                ),
            )
            add_special = bool(req.add_special_tokens)  # the template brings its own
        else:
            text = req.prompt or ""
            add_special = req.add_special_tokens is None or req.add_special_tokens
        ids = await offload(size, tok.encode, text, add_special)
        body = TokenizeResponse(
            count=len(ids),
            max_model_len=served.max_model_len,
            tokens=ids,
            token_strs=[tok.id_to_token(t) or token_text(tok, t) for t in ids]
            if req.return_token_strs
            else None,
        )
        return web.Response(
            body=body.model_dump_json(exclude_none=True), content_type="application/json"
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        req = await parse_body(request, DetokenizeRequest, self.ctx.settings)
        served = self._served(req.model)
        vocab = served.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}); got {bad[0]}", param="tokens")
        text = served.tokenizer.decode(req.tokens, skip_special_tokens=False)
        body = DetokenizeResponse(prompt=text)
        return web.Response(body=body.model_dump_json(), content_type="application/json")

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        """The tokenizer's configuration (vLLM's /tokenizer_info); `?model=` picks one."""
        served = self._served(request.query.get("model"))
        tok = served.tokenizer
        info: dict[str, object] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": served.max_model_len,
            "chat_template": tok.chat_template,
            **tok.special_tokens,
        }
        info.setdefault("eos_token", None)
        return web.Response(body=json.dumps(info), content_type="application/json")

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})
