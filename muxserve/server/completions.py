"""POST /v1/completions: one prompt (text or token ids) or a batch, n choices each."""

from __future__ import annotations

import time

from aiohttp import web
from pydantic import BaseModel

from muxserve.output_processor import RequestOutput
from muxserve.served_model import ServedModel
from muxserve.server.context import ServerContext, offload, parse_body
from muxserve.server.errors import APIError
from muxserve.server.generation import Choice, Generation
from muxserve.server.logprobs import CompletionLogprobsBuilder
from muxserve.server.protocol import CompletionRequest
from muxserve.server.responses import CompletionChoice, CompletionResponse, Usage
from muxserve.server.streaming import stream_generation
from muxserve.tokenizer import Tokenizer


def tokenize(tokenizer: Tokenizer, prompts: list[str] | list[list[int]]) -> list[list[int]]:
    """Token ids of each prompt; text is encoded as the engine encodes it (with BOS)."""
    return [(tokenizer.encode(p) if p else []) if isinstance(p, str) else list(p) for p in prompts]


class CompletionsHandler:
    """Serves /v1/completions from the engine in `ctx`."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        ctx = self.ctx
        req = await parse_body(request, CompletionRequest, ctx.settings.max_body_bytes)
        served = ctx.model(req.model)
        prompts = req.prompts()
        if len(prompts) * req.n > ctx.settings.max_choices:
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={req.n} is over {ctx.settings.max_choices} choices",
                param="n",
            )
        params = [req.params(j) for j in range(req.n)]
        ids = await offload(request.content_length or 0, tokenize, served.tokenizer, prompts)
        gen = Generation(ctx.client, served.name, ctx.metrics, arrival, "cmpl", ctx.active)
        try:
            await gen.submit(ids, params)
            if req.stream:
                return await self._stream(request, req, gen, served)
            return await self._complete(req, gen, served)
        finally:
            gen.close()

    async def _complete(
        self, req: CompletionRequest, gen: Generation, served: ServedModel
    ) -> web.Response:
        results = await gen.results()
        choices = []
        for choice, r in zip(gen.choices, results, strict=True):
            lp = None
            if req.logprobs is not None:
                lp = CompletionLogprobsBuilder(served.tokenizer).add(r.logprobs)
            choices.append(
                CompletionChoice(
                    index=choice.index, text=r.text, logprobs=lp, finish_reason=r.finish_reason
                )
            )
        body = CompletionResponse(
            id=gen.id,
            created=gen.created,
            model=served.name,
            choices=choices,
            usage=Usage.of(gen.prompt_tokens, sum(r.num_tokens for r in results)),
        )
        return web.Response(body=body.model_dump_json(), content_type="application/json")

    async def _stream(
        self, request: web.Request, req: CompletionRequest, gen: Generation, served: ServedModel
    ) -> web.StreamResponse:
        builders = {c.index: CompletionLogprobsBuilder(served.tokenizer) for c in gen.choices}
        want_logprobs = req.logprobs is not None

        def chunk(choice: Choice, out: RequestOutput) -> BaseModel | None:
            if not (out.text or out.finished or (want_logprobs and out.logprobs)):
                return None
            lp = builders[choice.index].add(out.logprobs) if want_logprobs else None
            return CompletionResponse(
                id=gen.id,
                created=gen.created,
                model=served.name,
                choices=[
                    CompletionChoice(
                        index=choice.index,
                        text=out.text,
                        logprobs=lp,
                        finish_reason=out.finish_reason if out.finished else None,
                    )
                ],
            )

        def usage(u: Usage) -> BaseModel:
            return CompletionResponse(
                id=gen.id, created=gen.created, model=served.name, choices=[], usage=u
            )

        return await stream_generation(request, gen, chunk, usage if req.include_usage else None)
