"""One HTTP request's engine requests (prompts x n): submitted, read and aborted together.

Also where the per-request metrics are taken: the handlers only shape what comes out.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from muxserve.client.protocol import EngineClient
from muxserve.errors import MeshUnavailableError
from muxserve.output_processor import RequestOutput
from muxserve.request import TokenLogprobs
from muxserve.sampling_params import SamplingParams
from muxserve.server.errors import APIError
from muxserve.server.metrics import ServerMetrics


@dataclass
class Choice:
    """One engine request: choice `index` of the response, for prompt `prompt_index`."""

    index: int
    prompt_index: int
    request_id: str
    prompt_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    finish_reason: str | None = None


@dataclass
class ChoiceResult:
    """A finished choice, as a non-streamed response needs it."""

    text: str
    num_tokens: int
    logprobs: list[TokenLogprobs]
    finish_reason: str
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.., when asked for

    @property
    def cumulative_logprob(self) -> float:
        """Sum of the generated tokens' logprobs: how best_of ranks candidates."""
        return sum(lp.logprob for lp in self.logprobs)


def best_of(
    choices: list[Choice], results: list[ChoiceResult], n: int
) -> list[tuple[int, int, ChoiceResult]]:
    """The n candidates of each prompt with the highest cumulative logprob, best first, as
    (response index, prompt index, result); candidates are in prompt order."""
    by_prompt: dict[int, list[tuple[Choice, ChoiceResult]]] = {}
    for c, r in zip(choices, results, strict=True):
        by_prompt.setdefault(c.prompt_index, []).append((c, r))
    out: list[tuple[int, int, ChoiceResult]] = []
    for p, items in sorted(by_prompt.items()):
        ranked = sorted(items, key=lambda cr: (-cr[1].cumulative_logprob, cr[0].index))[:n]
        out.extend((p * n + rank, p, r) for rank, (_, r) in enumerate(ranked))
    return out


class Generation:
    """The engine requests behind one HTTP request.

    Use as `try: submit(); ... read ... finally: close()`: `close()` aborts whatever has not
    finished (the client went away, or the server is stopping), which frees its KV blocks.
    """

    def __init__(
        self,
        client: EngineClient,
        model: str,
        metrics: ServerMetrics,
        arrival: float,
        prefix: str,
        active: set[Generation] | None = None,
        request_id: str | None = None,
    ) -> None:
        self.client = client
        self.active = active if active is not None else set()  # the server's in-flight ones
        self.model = model
        self.metrics = metrics
        self.series = metrics.models[model]
        self.arrival = arrival  # time.monotonic() when the HTTP request came in
        self.id = f"{prefix}-{request_id or uuid.uuid4().hex}"  # vLLM: the client's request_id
        self.created = int(time.time())
        self.choices: list[Choice] = []
        self.prompt_tokens = 0

    # ---- submit --------------------------------------------------------------------------
    async def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> None:
        """Queue every prompt once per params (choice i*n + j: prompt i, params j).

        All or nothing: if one is refused (queue full, prompt too long) the rest are aborted.
        """
        self.active.add(self)
        try:
            for i, ids in enumerate(prompts):
                for j, p in enumerate(params):
                    index = i * len(params) + j
                    rid = await self.client.add_request(
                        self.model, list(ids), p, f"{self.id}-{index}"
                    )
                    self.choices.append(Choice(index, i, rid, len(ids)))
        except BaseException:
            for c in self.choices:  # never started, as far as the client can tell: not counted
                self.client.abort(c.request_id)
            self.choices.clear()
            self.active.discard(self)
            raise
        self.prompt_tokens = sum(len(p) for p in prompts)  # usage: each prompt once, as OpenAI
        self.series.prompt_tokens.inc(self.prompt_tokens * len(params))
        self.series.params_n.observe(len(params))
        self.series.params_max_tokens.observe(params[0].max_tokens)

    # ---- read ----------------------------------------------------------------------------
    async def outputs(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Every choice's outputs as they come, interleaved; ends when all have finished.

        An output that ends a choice by abort or engine error raises APIError (503 / 500).
        """
        if len(self.choices) == 1:
            choice = self.choices[0]
            async for out in self._stream(choice):
                yield choice, self._observe(choice, out)
            return
        queue: asyncio.Queue[tuple[Choice, RequestOutput] | BaseException] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for out in self._stream(choice):
                    queue.put_nowait((choice, out))
            except Exception as e:
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        try:
            left = len(self.choices)
            while left:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                choice, out = item
                left -= out.finished
                yield choice, self._observe(choice, out)
        finally:
            for t in tasks:
                t.cancel()

    async def results(self) -> list[ChoiceResult]:
        """Wait for every choice to finish; results in choice order."""
        parts: list[list[RequestOutput]] = [[] for _ in self.choices]
        async for choice, out in self.outputs():
            parts[choice.index].append(out)
        results = []
        for outs in parts:
            last = outs[-1]
            assert last.finish_reason is not None
            prompt = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
            results.append(
                ChoiceResult(
                    "".join(o.text for o in outs),
                    last.completion_tokens,
                    [lp for o in outs for lp in o.logprobs],
                    last.finish_reason,
                    last.stop_reason,
                    None if prompt is None else list(prompt),
                )
            )
        return results

    async def _stream(self, choice: Choice) -> AsyncIterator[RequestOutput]:
        try:
            stream = self.client.stream(choice.request_id)
            async for out in stream:
                if out.finished and out.finish_reason in ("abort", "error", "timeout"):
                    self._finish(choice, out.finish_reason)
                    raise _ended(out)
                yield out
        except KeyError:  # aborted by the engine (shutting down) before we read anything
            self._finish(choice, "abort")
            raise _ended(None) from None
        except MeshUnavailableError as e:  # its mesh died: the request is lost, say where
            self._finish(choice, "error")
            raise unavailable(e) from None

    def _observe(self, choice: Choice, out: RequestOutput) -> RequestOutput:
        now = time.monotonic()
        m = self.series
        if out.token_ids:
            m.generation_tokens.inc(len(out.token_ids))
            if choice.first_token is None:
                m.ttft.observe(now - self.arrival)
            elif choice.last_token is not None:
                gap = (now - choice.last_token) / len(out.token_ids)
                for _ in out.token_ids:
                    m.itl.observe(gap)
            choice.first_token = choice.first_token or now
            choice.last_token = now
        if out.finished:
            m.e2e.observe(now - self.arrival)
            if out.timings is not None:
                m.queue.observe(out.timings.queue)
                m.prefill.observe(out.timings.prefill)
                m.decode.observe(out.timings.decode)
                m.inference.observe(out.timings.prefill + out.timings.decode)
                if out.timings.wake > 0:
                    m.wake.observe(out.timings.wake)
            m.request_prompt_tokens.observe(out.prompt_tokens)
            m.request_generation_tokens.observe(out.completion_tokens)
            self._finish(choice, out.finish_reason or "stop")
        return out

    def _finish(self, choice: Choice, reason: str) -> None:
        if choice.finish_reason is None:
            choice.finish_reason = reason
            self.metrics.requests.labels(self.model, reason).inc()

    # ---- end -----------------------------------------------------------------------------
    def close(self) -> None:
        """Abort every choice that has not finished; idempotent."""
        self.active.discard(self)
        for choice in self.choices:
            if choice.finish_reason is None:
                self.client.abort(choice.request_id)
                self._finish(choice, "abort")


def unavailable(e: MeshUnavailableError) -> APIError:
    """503 naming the mesh: the model is back once the mesh has restarted."""
    return APIError(503, str(e), "server_error", code="mesh_unavailable")


def _ended(out: RequestOutput | None) -> APIError:
    if out is not None and out.finish_reason == "timeout":
        return APIError(504, f"the request timed out: {out.error}", "server_error", code="timeout")
    if out is not None and out.finish_reason == "error":
        return APIError(500, f"the engine failed the request: {out.error}", "server_error")
    return APIError(
        503, "the request was aborted: the server is stopping", "server_error", code="unavailable"
    )
