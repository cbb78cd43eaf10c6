"""POST /v1/completions: one prompt (text or token ids) or a batch, n choices each (the n best
of best_of), optionally echoing the prompt with its logprobs."""

from __future__ import annotations

import time

from aiohttp import web
from pydantic import BaseModel

from muxserve.output_processor import RequestOutput
from muxserve.served_model import ServedModel
from muxserve.server.context import ServerContext, offload, parse_body
from muxserve.server.errors import APIError
from muxserve.server.generation import Choice, ChoiceResult, Generation, best_of
from muxserve.server.logprobs import CompletionLogprobsBuilder, vllm_prompt_logprobs
from muxserve.server.protocol import CompletionRequest
from muxserve.server.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
)
from muxserve.server.streaming import stream_generation
from muxserve.tokenizer import Tokenizer


def tokenize(
    tokenizer: Tokenizer,
    prompts: list[str] | list[list[int]],
    add_special_tokens: bool = True,
    truncate: int | None = None,
) -> list[list[int]]:
    """Token ids of each prompt; text is encoded as the engine encodes it (with BOS unless
    `add_special_tokens` is off); `truncate` keeps each prompt's last tokens (as vLLM)."""
    ids = [
        (tokenizer.encode(p, add_special_tokens) if p else []) if isinstance(p, str) else list(p)
        for p in prompts
    ]
    return [i[-truncate:] for i in ids] if truncate else ids


def echo_texts(tokenizer: Tokenizer, prompts: list[str] | list[list[int]]) -> list[str]:
    """What `echo` prepends: a text prompt as sent, token ids decoded (special tokens kept)."""
    return [
        p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False) for p in prompts
    ]


class CompletionsHandler:
    """Serves /v1/completions from the engine in `ctx`."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        ctx = self.ctx
        req = await parse_body(request, CompletionRequest, ctx.settings)
        req.check()
        served = ctx.model(req.model)
        prompts = req.prompts()
        if len(prompts) * req.candidates > ctx.settings.max_choices:
            raise APIError(
                400,
                f"{len(prompts)} prompts x {req.candidates} choices is over "
                f"{ctx.settings.max_choices}",
                param="best_of" if req.best_of else "n",
            )
        # best_of ranks candidates by their logprobs: ask for them even if the client did not
        logprobs = req.logprobs
        if logprobs is None and req.candidates > req.n:
            logprobs = 0
        params = [req.params(j, logprobs) for j in range(req.candidates)]
        ids = await offload(
            request.content_length or 0,
            tokenize,
            served.tokenizer,
            prompts,
            req.add_special_tokens,
            req.truncate_prompt_tokens,
        )
        gen = Generation(
            ctx.client, served.name, ctx.metrics, arrival, "cmpl", ctx.active, req.request_id
        )
        try:
            await gen.submit(ids, params)
            echo = echo_texts(served.tokenizer, prompts) if req.echo else None
            if req.stream:
                return await self._stream(request, req, gen, served, ids, echo)
            return await self._complete(req, gen, served, ids, echo)
        finally:
            gen.close()

    async def _complete(
        self,
        req: CompletionRequest,
        gen: Generation,
        served: ServedModel,
        ids: list[list[int]],
        echo: list[str] | None,
    ) -> web.Response:
        results = await gen.results()
        if req.candidates > req.n:
            picked = best_of(gen.choices, results, req.n)
        else:
            picked = [
                (c.index, c.prompt_index, r) for c, r in zip(gen.choices, results, strict=True)
            ]
        choices = [
            self._choice(req, served.tokenizer, index, ids[p], echo[p] if echo else None, r)
            for index, p, r in picked
        ]
        body = CompletionResponse(
            id=gen.id,
            created=gen.created,
            model=served.name,
            choices=choices,
            usage=Usage.of(gen.prompt_tokens, sum(r.num_tokens for _, _, r in picked)),
        )
        return web.Response(body=body.model_dump_json(), content_type="application/json")

    @staticmethod
    def _choice(
        req: CompletionRequest,
        tokenizer: Tokenizer,
        index: int,
        prompt_ids: list[int],
        echo: str | None,
        r: ChoiceResult,
    ) -> CompletionChoice:
        lp = None
        if req.logprobs is not None:
            builder = CompletionLogprobsBuilder(tokenizer, bool(req.return_tokens_as_token_ids))
            lp = CompletionLogprobs()
            if echo is not None:
                lp = builder.add_prompt(prompt_ids, r.prompt_logprobs)
            builder.add(r.logprobs, into=lp)
        return CompletionChoice(
            index=index,
            text=(echo or "") + r.text,
            logprobs=lp,
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
            prompt_logprobs=vllm_prompt_logprobs(tokenizer, prompt_ids, r.prompt_logprobs)
            if req.prompt_logprobs is not None
            else None,
        )

    async def _stream(
        self,
        request: web.Request,
        req: CompletionRequest,
        gen: Generation,
        served: ServedModel,
        ids: list[list[int]],
        echo: list[str] | None,
    ) -> web.StreamResponse:
        as_ids = bool(req.return_tokens_as_token_ids)
        builders = {
            c.index: CompletionLogprobsBuilder(served.tokenizer, as_ids) for c in gen.choices
        }
        want_logprobs = req.logprobs is not None
        echoed: set[int] = set()

        def chunk(choice: Choice, out: RequestOutput) -> BaseModel | None:
            text, lp = out.text, None
            first = choice.index not in echoed
            echoed.add(choice.index)
            if want_logprobs:
                lp = CompletionLogprobs()
                if echo is not None and first:
                    lp = builders[choice.index].add_prompt(
                        ids[choice.prompt_index], out.prompt_logprobs
                    )
                builders[choice.index].add(out.logprobs, into=lp)
            if echo is not None and first:
                text = echo[choice.prompt_index] + text
            if not (text or out.finished or (lp is not None and lp.tokens)):
                return None
            usage = None
            if req.continuous_usage:
                usage = Usage.of(choice.prompt_tokens, out.completion_tokens)
            return CompletionResponse(
                id=gen.id,
                created=gen.created,
                model=served.name,
                choices=[
                    CompletionChoice(
                        index=choice.index,
                        text=text,
                        logprobs=lp,
                        finish_reason=out.finish_reason if out.finished else None,
                        stop_reason=out.stop_reason if out.finished else None,
                    )
                ],
                usage=usage,
            )

        def usage(u: Usage) -> BaseModel:
            return CompletionResponse(
                id=gen.id, created=gen.created, model=served.name, choices=[], usage=u
            )

        return await stream_generation(request, gen, chunk, usage if req.include_usage else None)
