"""POST /v1/chat/completions: messages rendered with the model's chat template, n choices;
structured output and forced tool calls (`tool_choice` "required" or a named function)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from muxserve.output_processor import RequestOutput
from muxserve.served_model import ServedModel
from muxserve.server.context import ServerContext, offload, parse_body
from muxserve.server.errors import APIError
from muxserve.server.generation import Choice, ChoiceResult, Generation, best_of
from muxserve.server.logprobs import chat_logprobs, vllm_prompt_logprobs
from muxserve.server.protocol import ChatCompletionRequest
from muxserve.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    Usage,
)
from muxserve.server.streaming import stream_generation
from muxserve.server.tools import NamedToolChoice, call_id, parse_calls
from muxserve.tokenizer import Tokenizer


def render(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    req: ChatCompletionRequest | None = None,
) -> list[int]:
    """The prompt's token ids, as transformers builds them: the template brings its own BOS.

    With `req`: its tools, documents, template and template variables; `continue_final_message`
    leaves the last message open (the text after its content is cut, as transformers does).
    """
    text = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        tools=[t.model_dump(exclude_none=True) for t in req.tools] if req and req.tools else None,
        documents=req.documents if req else None,
        chat_template=req.chat_template if req else None,
        extra=req.chat_template_kwargs if req else None,
    )
    if req is not None and req.continue_final_message and messages:
        last = str(messages[-1].get("content") or "").strip()
        cut = text.rfind(last) if last else -1
        if cut >= 0:
            text = text[: cut + len(last)]
    add_special = req.add_special_tokens if req is not None else False
    ids = tokenizer.encode(text, add_special_tokens=add_special)
    if req is not None and req.truncate_prompt_tokens:
        ids = ids[-req.truncate_prompt_tokens :]
    return ids


class ChatHandler:
    """Serves /v1/chat/completions from the engine in `ctx`."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        ctx = self.ctx
        req = await parse_body(request, ChatCompletionRequest, ctx.settings)
        req.check()
        served = ctx.model(req.model)
        if req.candidates > ctx.settings.max_choices:
            raise APIError(400, f"n is over {ctx.settings.max_choices}", param="n")
        messages = [m.for_template() for m in req.messages]
        size = request.content_length or 0
        ids = await offload(
            size, render, served.tokenizer, messages, req.add_generation_prompt, req
        )
        # no limit asked: up to the context (a prompt that fills it is refused by the engine)
        max_tokens = req.requested_max_tokens() or max(1, served.max_model_len - len(ids))
        logprobs = req.requested_logprobs()
        if logprobs is None and req.candidates > req.n:
            logprobs = 0  # best_of ranks candidates by their logprobs
        params = [req.params(max_tokens, j, logprobs) for j in range(req.candidates)]
        gen = Generation(
            ctx.client, served.name, ctx.metrics, arrival, "chatcmpl", ctx.active, req.request_id
        )
        # vLLM's echo: a last assistant message is continued, and repeated in the response
        last = req.messages[-1]
        echo = last.text() if req.echo and last.role == "assistant" else None
        try:
            await gen.submit([ids], params)
            if req.stream:
                return await self._stream(request, req, gen, served, echo)
            return await self._complete(req, gen, served, ids, echo)
        finally:
            gen.close()

    async def _complete(
        self,
        req: ChatCompletionRequest,
        gen: Generation,
        served: ServedModel,
        ids: list[int],
        echo: str | None,
    ) -> web.Response:
        results = await gen.results()
        if req.candidates > req.n:
            picked = best_of(gen.choices, results, req.n)
        else:
            picked = [
                (c.index, c.prompt_index, r) for c, r in zip(gen.choices, results, strict=True)
            ]
        as_ids = bool(req.return_tokens_as_token_ids)
        choices = [
            ChatChoice(
                index=index,
                message=self._message(req, r, echo),
                logprobs=chat_logprobs(served.tokenizer, r.logprobs, as_ids)
                if req.logprobs
                else None,
                finish_reason=self._finish_reason(req, r),
                stop_reason=r.stop_reason,
            )
            for index, _, r in picked
        ]
        body = ChatCompletionResponse(
            id=gen.id,
            created=gen.created,
            model=served.name,
            choices=choices,
            usage=Usage.of(gen.prompt_tokens, sum(r.num_tokens for _, _, r in picked)),
            prompt_logprobs=vllm_prompt_logprobs(served.tokenizer, ids, results[0].prompt_logprobs)
            if req.prompt_logprobs is not None
            else None,
        )
        return web.Response(body=body.model_dump_json(), content_type="application/json")

    @staticmethod
    def _message(req: ChatCompletionRequest, r: ChoiceResult, echo: str | None) -> AssistantMessage:
        if req.tool_schema() is not None:
            calls = parse_calls(req.tool_choice, r.text)
            if calls is not None:
                return AssistantMessage(content=None, tool_calls=calls)
        return AssistantMessage(content=(echo or "") + r.text)

    @staticmethod
    def _finish_reason(req: ChatCompletionRequest, r: ChoiceResult) -> str:
        """As vLLM: "tool_calls" when tool_choice "required" produced calls."""
        if req.tool_choice == "required" and r.finish_reason == "stop":
            return "tool_calls"
        return r.finish_reason

    async def _stream(
        self,
        request: web.Request,
        req: ChatCompletionRequest,
        gen: Generation,
        served: ServedModel,
        echo: str | None,
    ) -> web.StreamResponse:
        as_ids = bool(req.return_tokens_as_token_ids)
        named = req.tool_choice if isinstance(req.tool_choice, NamedToolChoice) else None
        required = req.tool_choice == "required"
        texts = {c.index: "" for c in gen.choices}  # "required": the array, parsed at the end

        def make(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=gen.id, created=gen.created, model=served.name, choices=choices, usage=usage
            )

        def usage_of(choice: Choice, out: RequestOutput | None) -> Usage | None:
            if not req.continuous_usage:
                return None
            return Usage.of(choice.prompt_tokens, out.completion_tokens if out else 0)

        def chunk(choice: Choice, out: RequestOutput) -> BaseModel | None:
            lp = chat_logprobs(served.tokenizer, out.logprobs, as_ids) if req.logprobs else None
            reason = out.finish_reason if out.finished else None
            delta = Delta(content=out.text or None)
            if named is not None:  # the arguments stream as they are generated
                delta = Delta(
                    tool_calls=[
                        DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=out.text))
                    ]
                    if out.text
                    else None
                )
            elif required:
                texts[choice.index] += out.text
                delta = Delta()
                if out.finished:
                    calls = parse_calls(req.tool_choice, texts[choice.index])
                    if calls is None:
                        delta = Delta(content=texts[choice.index])
                    else:
                        delta = Delta(
                            tool_calls=[
                                DeltaToolCall(
                                    index=i,
                                    id=c.id,
                                    type="function",
                                    function=DeltaFunctionCall(
                                        name=c.function.name, arguments=c.function.arguments
                                    ),
                                )
                                for i, c in enumerate(calls)
                            ]
                        )
                        if reason == "stop":
                            reason = "tool_calls"
                elif not out.finished:
                    return None
            if not (out.text or out.finished or (lp is not None and lp.content)):
                return None
            return make(
                [
                    ChatChunkChoice(
                        index=choice.index,
                        delta=delta,
                        logprobs=lp,
                        finish_reason=reason,
                        stop_reason=out.stop_reason if out.finished else None,
                    )
                ],
                usage_of(choice, out),
            )

        # as OpenAI: each choice opens with the role and empty content (vLLM's echo: the last
        # message); a named tool call opens with its id and name
        first = []
        for c in gen.choices:
            if named is not None:
                delta = Delta(
                    role="assistant",
                    tool_calls=[
                        DeltaToolCall(
                            index=0,
                            id=call_id(),
                            type="function",
                            function=DeltaFunctionCall(name=named.function.name, arguments=""),
                        )
                    ],
                )
            else:
                delta = Delta(role="assistant", content=echo or "")
            first.append(make([ChatChunkChoice(index=c.index, delta=delta)], usage_of(c, None)))
        return await stream_generation(
            request,
            gen,
            chunk,
            (lambda u: make([], u)) if req.include_usage else None,
            first,
        )
