"""A job's results applied to its requests, and the one way a request ends.

A finished job's outputs advance its requests (computed tokens, sampled tokens, logprobs) and
end those that stop; a failed job's requests are computed again or end with an error; an abort
or a timeout ends a request that is not in a running job. Split from `Scheduler`, which hands
out the jobs; this decides what their results do.
"""

from __future__ import annotations

from collections.abc import Callable

from muxserve.kv.block_tables import BlockTables
from muxserve.request import FinishReason, Request, RequestStatus, TokenLogprobs
from muxserve.scheduler.batcher import Batcher
from muxserve.scheduler.job import Job, JobResult, Phase, SeqResult
from muxserve.scheduler.model_slot import ModelQueue

MAX_RETRIES = 2  # a request whose jobs are lost this often fails (it may be what kills them)


class Outcomes:
    """Applies job results and ends requests, freeing their blocks.

    `requests` is the scheduler's index of the requests it holds; an ended one leaves it and
    joins `finished` until the scheduler takes that list (`take_finished`). `rebalance_later`
    asks for a rebalance at the next step: under a static partition a freed block may be a
    lent share coming back.
    """

    def __init__(
        self,
        requests: dict[str, Request],
        tables: BlockTables,
        batcher: Batcher,
        *,
        adaptive: bool,
        clock: Callable[[], float],
        rebalance_later: Callable[[], None],
    ) -> None:
        self.requests = requests
        self.tables = tables
        self.batcher = batcher
        self.adaptive = adaptive
        self.clock = clock
        self._rebalance_later = rebalance_later
        self.finished: list[str] = []  # ended since the last `take_finished`

    def take_finished(self) -> tuple[str, ...]:
        """The requests ended since the previous call, their blocks freed."""
        finished, self.finished = tuple(self.finished), []
        return finished

    def apply(self, q: ModelQueue, job: Job, result: JobResult) -> list[Request]:
        """Apply a finished job's outputs: its requests' computed tokens, and their sampled
        tokens, finishing a request where it stops: a stop token, a length, or what its
        output check says (a stop string, a grammar). The one place a request's end is
        decided, but for aborts and failed jobs. Returns the requests that changed.

        This loop runs once per request per step: it reads fields, not properties, keeps
        what is the same for the whole job in locals, and leaves the rare cases (a finish
        asked meanwhile, prompt logprobs, logprobs) to their branches.
        """
        changed: list[Request] = []
        requests, prefill = self.requests, job.phase is Phase.PREFILL
        max_len, finish = q.slot.max_model_len, self.finish
        for seq, out in zip(job.seqs, result.outputs, strict=True):
            req = requests.get(seq.request_id)
            if req is None:
                continue
            req.in_flight = False
            pending = req.pending_finish
            if pending is not None:
                finish(q, req, pending)
                changed.append(req)
                continue
            req.num_computed_tokens = seq.start_pos + len(seq.token_ids)  # seq.end_pos
            # A recomputed request whose chunk stops one short is decoding already: its last
            # token is an output token that the next decode step feeds.
            if prefill and (seq.sample or req.is_decoding):
                q.prefilling.remove(req)
            if out.prompt_logprobs:
                _add_prompt_logprobs(req, out)
            params = req.params
            if params.max_tokens == 0 and req.num_computed_tokens == req.num_tokens:
                finish(q, req, FinishReason.LENGTH)  # prompt logprobs only: done
                changed.append(req)
                continue
            token = out.token_id
            if token is None:
                continue
            output = req.output_token_ids
            output.append(token)
            if params.logprobs is not None and out.logprob is not None:
                req.output_logprobs.append(TokenLogprobs(token, out.logprob, out.top_logprobs))
            n, reason = len(output), None
            if token in req.stop_ids and n > params.min_tokens:  # stop tokens are masked before
                reason = FinishReason.STOP
            elif n >= params.max_tokens or len(req.prompt_token_ids) + n >= max_len:
                reason = FinishReason.LENGTH
            if req.output_check is not None:
                reason = req.output_check.check(req, reason)
            if reason is not None:
                finish(q, req, reason)
            changed.append(req)
        return changed

    def failed(self, q: ModelQueue, job: Job, retry: bool) -> list[Request]:
        """A job that failed: its requests are computed again where its workers were lost
        (`retry`, up to MAX_RETRIES times each), or end with an error; returns those ended."""
        changed: list[Request] = []
        for seq in job.seqs:
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            req.in_flight = False
            pending = req.pending_finish
            if pending is None and retry and req.num_retries < MAX_RETRIES:
                req.num_retries += 1  # its worker was lost, not its fault: compute it again
                self.batcher.preempt(q, req)
                continue
            self.finish(q, req, pending or FinishReason.ERROR)
            changed.append(req)
        return changed

    def finish(self, q: ModelQueue, req: Request, reason: FinishReason) -> None:
        """End `req` (not in flight) for `reason`: free its blocks, take it off its queues."""
        self.tables.release(req.request_id)
        self.finished.append(req.request_id)
        if req.status is RequestStatus.RUNNING:
            q.running.remove(req)
            if req in q.prefilling:
                q.prefilling.remove(req)
        elif req.status is RequestStatus.WAITING:
            q.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.pending_finish = None
        del self.requests[req.request_id]
        now = self.clock()
        if reason not in (FinishReason.ABORT, FinishReason.TIMEOUT):  # no measure of service
            q.service.on_finished(now)
        if not q.has_work():
            q.service.on_idle(now)
        if not self.adaptive:  # blocks freed: a share lent out may come back now
            self._rebalance_later()


def _add_prompt_logprobs(req: Request, out: SeqResult) -> None:
    """Keep the prompt logprobs not had yet (a recomputed chunk scores its tokens again)."""
    have = len(req.prompt_logprobs) + 1  # position of the next one wanted (0 has none)
    skip = have - out.prompt_start
    if skip < 0:
        raise AssertionError(
            f"{req.request_id}: prompt logprobs from {out.prompt_start}, expected {have}"
        )
    req.prompt_logprobs.extend(out.prompt_logprobs[skip:])
