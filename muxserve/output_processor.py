"""Turns a request's new tokens into what its caller sees: text deltas, stop strings, usage.

Runs in the engine loop; hands each output to the request's `OutputSink`, which an asyncio
consumer (the server) or a plain thread (offline `generate`) drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from muxserve.request import FinishReason, Request, TokenLogprobs
from muxserve.structured_output import Constraint
from muxserve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class RequestTimings:
    """Where a finished request's time went (seconds), as vLLM's request histograms split it."""

    queue: float  # arrival to first admission
    prefill: float  # admission to the first token (to the end of the prefill with no tokens)
    decode: float  # first token to the last
    wake: float = 0.0  # of `queue`, the wait for its model to wake (it was asleep)


@dataclass(frozen=True)
class RequestOutput:
    """One increment of a request's output; the last one has `finished` set."""

    request_id: str
    model: str
    text: str  # new text since the previous output
    token_ids: tuple[int, ...]  # new token ids since the previous output
    logprobs: tuple[TokenLogprobs, ...]  # for the new tokens, when asked for
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", "error" on the last output
    prompt_tokens: int
    completion_tokens: int  # so far
    error: str | None = None
    # logprobs of prompt tokens 1.. (the first has none), once, in the first output after the
    # prefill, when params.prompt_logprobs is set
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    timings: RequestTimings | None = None  # on the last output of a request that ran


@dataclass
class Completion:
    """A whole finished request, as the offline `generate()` returns it."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    prompt_logprobs: list[TokenLogprobs] | None = None  # of prompt tokens 1.., when asked for

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = list(out.prompt_logprobs)
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error


class OutputSink:
    """A thread-safe queue of one request's outputs, readable from a thread or an event loop."""

    def __init__(self) -> None:
        self._items: deque[RequestOutput] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._watcher: threading.Event | None = None

    def watch(self, event: threading.Event) -> None:
        """Set `event` on every output from now on (and now, if outputs are waiting).

        A thread reading many sinks (the engine's offline `generate`) waits on one event.
        """
        with self._lock:
            self._watcher = event
            if self._items:
                event.set()

    def put(self, out: RequestOutput) -> None:
        with self._lock:
            self._items.append(out)
            loop, event, watcher = self._loop, self._event, self._watcher
        if watcher is not None:
            watcher.set()
        if loop is not None and event is not None:
            # the reader's loop may have closed (it went away): then there is nothing to wake
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def drain(self) -> list[RequestOutput]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    async def get(self) -> RequestOutput:
        """The next output, waiting on the running event loop."""
        with self._lock:
            if self._event is None:
                self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
            event = self._event
        while True:
            event.clear()
            with self._lock:
                if self._items:
                    return self._items.popleft()
            await event.wait()


class TextState:
    """Per-request detokenizer and stop-string matcher; the request's `OutputCheck`.

    The scheduler calls `check` with each new token (under the engine's lock, on its loop
    thread, which alone advances grammars); the engine then calls `emit`.
    """

    def __init__(
        self,
        req: Request,
        tokenizer: Tokenizer,
        sink: OutputSink,
        constraint: Constraint | None = None,
    ) -> None:
        self.request_id = req.request_id
        self.model = req.model
        self.prompt_tokens = req.num_prompt_tokens
        self.sink = sink
        self.stop = req.params.stop
        self.include_stop = req.params.include_stop_str_in_output
        self.min_tokens = req.params.min_tokens
        self.stop_reason: str | int | None = None
        self.prompt_logprobs_sent = req.params.prompt_logprobs is None
        # hold back text that could still turn out to start a stop string
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.detok = IncrementalDetokenizer(
            tokenizer, req.prompt_token_ids, req.params.skip_special_tokens
        )
        self.text = ""  # all text, minus a matched stop string
        self.sent = 0  # characters of `text` already sent
        self.tokens_seen = 0  # output tokens detokenized
        self.tokens_sent = 0  # output tokens sent
        self.logprobs_seen = 0
        self.stopped_by_string = False
        self.constraint = constraint  # the request's grammar, if it has one
        self.error: str | None = None  # why the grammar ended it
        self.settled = False  # the text has taken the request's end (flushed, or cut)
        self.first_token_time: float | None = None

    def check(self, req: Request, reason: FinishReason | None) -> FinishReason | None:
        """`OutputCheck`: the request's end after its last token. The stop ids and lengths
        come first (`reason`), then the grammar (complete: stop; a refused token: an error),
        then stop strings; the text takes every token either way."""
        c = self.constraint
        if reason is None and c is not None:
            if not c.advance(req.output_token_ids):  # a bug, or a grammar llguidance gave up on
                reason = FinishReason.ERROR
                self.error = f"structured output: the grammar refused a token ({c.error})"
            elif c.done:
                reason = FinishReason.STOP
        if self.update(req, reason) and reason is None:
            reason = FinishReason.STOP
        return reason

    def update(self, req: Request, reason: FinishReason | None) -> bool:
        """Take the request's new tokens, knowing its end (`reason`; None: not ended yet);
        True if a stop string matched."""
        new = req.output_token_ids[self.tokens_seen :]
        self.tokens_seen = len(req.output_token_ids)
        if self.first_token_time is None and self.tokens_seen:
            self.first_token_time = time.monotonic()
        self.settled |= reason is not None
        if reason is FinishReason.STOP and new:
            last = new[-1]
            if last in req.params.stop_token_ids and not self.stopped_by_string:
                self.stop_reason = last
            if (last in req.eos_token_ids or last in req.params.stop_token_ids) and not (
                self.include_stop
            ):
                new = new[:-1]  # a stop token ends the text; it is not part of it
        if self.stopped_by_string:
            return False
        delta = self.detok.step(new)
        if reason is not None:
            delta += self.detok.flush()
        if not delta:
            return False
        start = max(len(self.text) - self.hold, 0)
        self.text += delta
        if self.tokens_seen <= self.min_tokens:  # as vLLM: no stop string before min_tokens
            return False
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0:
                self.text = self.text[: i + len(s) if self.include_stop else i]
                self.stopped_by_string = True
                self.stop_reason = s
        self.settled |= self.stopped_by_string
        return self.stopped_by_string

    def fail(self, error: str) -> None:
        """End the stream with an error whatever the request's state (the engine loop died)."""
        self.sink.put(
            RequestOutput(
                request_id=self.request_id,
                model=self.model,
                text="",
                token_ids=(),
                logprobs=(),
                finished=True,
                finish_reason=FinishReason.ERROR.value,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.tokens_seen,
                error=error,
            )
        )

    def emit(self, req: Request, error: str | None = None) -> None:
        """Send what is new since the last output (all of it when the request finished)."""
        done = req.is_finished
        upto = len(self.text) if done or self.stopped_by_string else len(self.text) - self.hold
        upto = max(upto, self.sent)
        tokens = tuple(req.output_token_ids[self.tokens_sent :])
        logprobs = tuple(req.output_logprobs[self.logprobs_seen :])
        prompt_logprobs = None
        if not self.prompt_logprobs_sent and (done or not req.wants_prompt_logprobs):
            prompt_logprobs = tuple(req.prompt_logprobs)
            self.prompt_logprobs_sent = True
        if not done and not tokens and upto == self.sent and prompt_logprobs is None:
            return
        self.tokens_sent = len(req.output_token_ids)
        self.logprobs_seen = len(req.output_logprobs)
        reason = req.finish_reason.value if done and req.finish_reason else None
        self.sink.put(
            RequestOutput(
                request_id=self.request_id,
                model=self.model,
                text=self.text[self.sent : upto],
                token_ids=tokens,
                logprobs=logprobs,
                finished=done,
                finish_reason=reason,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=len(req.output_token_ids),
                error=error,
                prompt_logprobs=prompt_logprobs,
                stop_reason=self.stop_reason if done else None,
                timings=timings_of(req, self.first_token_time) if done else None,
            )
        )
        self.sent = upto


def timings_of(req: Request, first_token_time: float | None) -> RequestTimings | None:
    """A finished request's queue, prefill and decode times; None if it never ran."""
    if req.scheduled_time is None:
        return None
    now = time.monotonic()
    first = first_token_time if first_token_time is not None else now
    return RequestTimings(
        queue=max(req.scheduled_time - req.arrival_time, 0.0),
        prefill=max(first - req.scheduled_time, 0.0),
        decode=max(now - first, 0.0),
        wake=req.wake_time,
    )
