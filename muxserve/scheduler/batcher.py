"""Building one model's next job: the sequences it runs, and the room they need.

Prefill admits waiting requests and continues chunked prefills within a token budget; decode
takes one token of every running request, preempting the model's newest requests when its
blocks run short. Split from `Scheduler`, which decides which (model, phase) runs and applies
results; this decides what a job of that (model, phase) holds.
"""

from __future__ import annotations

from collections.abc import Callable

from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.request import Request, RequestStatus
from muxserve.scheduler.job import SeqWork
from muxserve.scheduler.model_slot import ModelQueue

NO_TOKENS: frozenset[int] = frozenset()  # nothing banned (one object, not one per step)


class Batcher:
    """Forms the sequences of one model's job and makes room for them in the pool.

    Every request taken into a job is in flight from then on. `rebalance` re-splits the
    quotas now; `on_short` tells the scheduler that work waits on quota, so that it rebalances
    at its next step. Preemptions are counted here, in all and per model.
    """

    def __init__(
        self,
        pool: BlockPool,
        tables: BlockTables,
        *,
        prefill_token_budget: int,
        max_batch_size: int,
        rebalance: Callable[[], None],
        on_short: Callable[[], None],
    ) -> None:
        self.pool = pool
        self.tables = tables
        self.prefill_token_budget = prefill_token_budget
        self.max_batch_size = max_batch_size
        self._rebalance = rebalance
        self._on_short = on_short
        self.num_preemptions = 0

    def prefill(self, q: ModelQueue) -> tuple[list[SeqWork], list[str]]:
        """Continue chunked prefills, then admit waiting requests FIFO, within the token budget.

        Every request taken is in flight from here (`_chunk`); a job is formed of them all.
        Returns the chunks and the requests admitted now (their block tables are new).
        """
        budget, seqs, admitted = self.prefill_token_budget, list[SeqWork](), list[str]()
        for req in q.prefilling:
            if budget <= 0 or len(seqs) >= self.max_batch_size:
                return seqs, admitted
            if not req.in_flight:
                seqs.append(self._chunk(req, budget))
                budget -= len(seqs[-1].token_ids)
        while q.waiting and budget > 0 and len(seqs) < self.max_batch_size:
            req = q.waiting[0]
            # leave each running request of the model room for its next block (a watermark), so
            # admitting one more does not force a preemption a few decode steps later
            need = self.tables.blocks_to_cover(q.name, req.request_id, req.num_tokens)
            reserve = len(q.running) * q.slot.layout.blocks_per_logical
            if not self.pool.can_allocate(q.name, need + reserve):
                self._on_short()
                break
            self.tables.cover(q.name, req.request_id, req.num_tokens)
            q.waiting.popleft()
            req.status = RequestStatus.RUNNING
            q.running.append(req)
            q.prefilling.append(req)
            admitted.append(req.request_id)
            seqs.append(self._chunk(req, budget))
            budget -= len(seqs[-1].token_ids)
        return seqs, admitted

    def _chunk(self, req: Request, budget: int) -> SeqWork:
        """The request's next prefill chunk, within `budget` tokens; it is in flight from now."""
        req.in_flight = True
        start = req.num_computed_tokens
        end = min(req.num_tokens, start + budget)
        step = len(req.output_token_ids)
        prompt_len, next_token = 0, None
        if req.wants_prompt_logprobs and start < req.num_prompt_tokens:
            prompt_len = req.num_prompt_tokens
            next_token = req.token_at(end) if end < prompt_len else None
        return SeqWork(
            request_id=req.request_id,
            token_ids=req.tokens_from(start, end),
            start_pos=start,
            block_table=self.tables.table(req.request_id),
            # max_tokens 0 (prompt logprobs only): the prefill ends the request, nothing sampled
            sample=end == req.num_tokens and req.params.max_tokens > 0,
            params=req.params,
            seed=req.seed,
            step=step,
            banned=req.banned if step < req.params.min_tokens else NO_TOKENS,
            prompt_len=prompt_len,
            next_token=next_token,
        )

    def decode(self, q: ModelQueue) -> list[SeqWork]:
        """One token for each decoding request, oldest first; preempt the newest when short.

        Every request taken is in flight from here; a job is formed of them all. This runs
        once per model per step over every running request: the loop reads fields and dict
        views, not properties or methods, and builds each SeqWork positionally.
        """
        seqs: list[SeqWork] = []
        limit, candidates = self.max_batch_size, list(q.running)  # a copy: room may preempt
        if limit <= 0:
            return seqs
        capped = len(candidates) > limit  # else the batch cannot fill up: no need to count
        add, capacities, tables = seqs.append, self.tables.capacities, self.tables.by_request
        running = RequestStatus.RUNNING
        for req in candidates:
            # `req.is_decoding`: all but the last sampled token are in the pool
            if req.in_flight or req.status is not running:
                continue
            out = req.output_token_ids
            step = len(out)  # the index of the token to sample
            start = len(req.prompt_token_ids) + step - 1  # the last token's position
            if req.num_computed_tokens != start or not step:
                continue
            rid = req.request_id
            if start >= capacities.get(rid, 0) and not self._make_room(q, req):
                continue
            req.in_flight = True
            params, history = req.params, None
            if req.penalised and not req.history_sent:
                history = tuple(req.all_token_ids[:start])
                req.history_sent = True
            add(
                SeqWork(
                    rid,  # request_id
                    (out[-1],),  # token_ids
                    start,  # start_pos
                    tables[rid],  # block_table
                    True,  # sample
                    params,
                    req.seed,
                    step,
                    history,
                    req.banned if step < params.min_tokens else NO_TOKENS,  # banned
                )
            )
            if capped and len(seqs) >= limit:
                break
        return seqs

    def _make_room(self, q: ModelQueue, req: Request) -> bool:
        """Cover `req`'s next token: borrow free blocks first, else preempt newer requests.

        Victims are the requests not in flight, newest first: those already taken into this
        step's batch are in flight, and `req` itself comes before any older one.
        """
        rebalanced = False
        while not self.tables.can_cover(q.name, req.request_id, req.num_tokens):
            need = self.tables.blocks_to_cover(q.name, req.request_id, req.num_tokens)
            if not rebalanced and self.pool.num_free >= need:
                # the quota is stale, not the pool full: rebalance before evicting anyone
                self._rebalance()
                rebalanced = True
                continue
            victim = next((r for r in reversed(q.running) if not r.in_flight), None)
            if victim is None:
                self._on_short()
                return False
            self.preempt(q, victim)
            if victim is req:
                return False
        self.tables.cover(q.name, req.request_id, req.num_tokens)
        return True

    def preempt(self, q: ModelQueue, req: Request) -> None:
        """Free a request's blocks; it recomputes its tokens when admitted again."""
        self.tables.release(req.request_id)
        q.running.remove(req)
        if req in q.prefilling:
            q.prefilling.remove(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.history_sent = False  # its next decode runner may have forgotten it
        req.num_preemptions += 1
        self.num_preemptions += 1
        q.preemptions += 1
        self._on_short()
        q.requeue(req)
