"""POST /v1/chat/completions: messages rendered with the model's chat template, n choices."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from muxserve.output_processor import RequestOutput
from muxserve.served_model import ServedModel
from muxserve.server.context import ServerContext, offload, parse_body
from muxserve.server.errors import APIError
from muxserve.server.generation import Choice, Generation
from muxserve.server.logprobs import chat_logprobs
from muxserve.server.protocol import ChatCompletionRequest
from muxserve.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Delta,
    Usage,
)
from muxserve.server.streaming import stream_generation
from muxserve.tokenizer import Tokenizer


def render(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool
) -> list[int]:
    """The prompt's token ids, as transformers builds them: the template brings its own BOS."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


class ChatHandler:
    """Serves /v1/chat/completions from the engine in `ctx`."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        ctx = self.ctx
        req = await parse_body(request, ChatCompletionRequest, ctx.settings.max_body_bytes)
        served = ctx.model(req.model)
        if req.n > ctx.settings.max_choices:
            raise APIError(400, f"n is over {ctx.settings.max_choices}", param="n")
        messages = [m.for_template() for m in req.messages]
        size = request.content_length or 0
        ids = await offload(size, render, served.tokenizer, messages, req.add_generation_prompt)
        # no limit asked: up to the context (a prompt that fills it is refused by the engine)
        max_tokens = req.requested_max_tokens() or max(1, served.max_model_len - len(ids))
        params = [req.params(max_tokens, j) for j in range(req.n)]
        gen = Generation(ctx.client, served.name, ctx.metrics, arrival, "chatcmpl", ctx.active)
        try:
            await gen.submit([ids], params)
            if req.stream:
                return await self._stream(request, req, gen, served)
            return await self._complete(req, gen, served)
        finally:
            gen.close()

    async def _complete(
        self, req: ChatCompletionRequest, gen: Generation, served: ServedModel
    ) -> web.Response:
        results = await gen.results()
        choices = [
            ChatChoice(
                index=choice.index,
                message=AssistantMessage(content=r.text),
                logprobs=chat_logprobs(served.tokenizer, r.logprobs) if req.logprobs else None,
                finish_reason=r.finish_reason,
            )
            for choice, r in zip(gen.choices, results, strict=True)
        ]
        body = ChatCompletionResponse(
            id=gen.id,
            created=gen.created,
            model=served.name,
            choices=choices,
            usage=Usage.of(gen.prompt_tokens, sum(r.num_tokens for r in results)),
        )
        return web.Response(body=body.model_dump_json(), content_type="application/json")

    async def _stream(
        self, request: web.Request, req: ChatCompletionRequest, gen: Generation, served: ServedModel
    ) -> web.StreamResponse:
        def make(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=gen.id, created=gen.created, model=served.name, choices=choices, usage=usage
            )

        def chunk(choice: Choice, out: RequestOutput) -> BaseModel | None:
            lp = chat_logprobs(served.tokenizer, out.logprobs) if req.logprobs else None
            if not (out.text or out.finished or (lp is not None and lp.content)):
                return None
            return make(
                [
                    ChatChunkChoice(
                        index=choice.index,
                        delta=Delta(content=out.text or None),
                        logprobs=lp,
                        finish_reason=out.finish_reason if out.finished else None,
                    )
                ]
            )

        # as OpenAI: each choice opens with the role and empty content
        first = [
            make([ChatChunkChoice(index=c.index, delta=Delta(role="assistant", content=""))])
            for c in gen.choices
        ]
        return await stream_generation(
            request,
            gen,
            chunk,
            (lambda u: make([], u)) if req.include_usage else None,
            first,
        )
