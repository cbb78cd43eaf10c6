"""Acceptance test "Pool": random traffic never breaks the pool, and draining frees it all.

Random sequences of add / abort / finish / bursts of long requests (small pools, so requests
are preempted) over three models with different KV layouts, under each policy (adbs, fcfs)
and KV mode (unified, static). A fake runner completes jobs, some with an error. Every step
keeps `check_integrity()`; after draining, every block is free and no request is left, and
every request's tokens are exactly what the runner produced for it, preempted or not.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from muxserve.errors import PromptTooLongError, QueueFullError
from muxserve.request import FinishReason, Request
from tests.helpers.scheduler import (
    FakeRunner,
    make_layout,
    make_request,
    make_scheduler,
    make_slot,
    step_token,
)

NUM_BLOCKS = 30  # static: 10 blocks per model
EOS = 13  # step_token gives 13 at step 1 for request ids whose letters sum to 3 mod 7
LAYOUTS = {
    "a": make_layout(),  # 4 tokens per block, 1 block per logical block
    "b": make_layout(num_layers=2, head_dim=16),  # 2 tokens per block, 2 per logical
    "c": make_layout(num_kv_heads=3, head_dim=4, dtype_bytes=4),  # 4 tokens, 3 per logical
}
SLOTS = [
    make_slot(m, layout=lo, max_model_len=24, rate=r, prefill_share=0.5, decode_share=0.4)
    for (m, lo), r in zip(LAYOUTS.items(), (4.0, 1.0, 1.0), strict=True)  # weights 128, 128, 96
]


class PoolMachine(RuleBasedStateMachine):
    policy = "adbs"
    kv_mode = "unified"

    def __init__(self) -> None:
        super().__init__()
        self.sched = make_scheduler(
            SLOTS,
            NUM_BLOCKS,
            policy=self.policy,
            kv_mode=self.kv_mode,
            prefill_token_budget=8,
            max_batch_size=3,
            rebalance_interval=3,
        )
        self.runner = FakeRunner(self.sched)
        self.added: dict[str, Request] = {}
        self.asked: dict[str, set[FinishReason]] = {}  # finishes asked by the test
        self.errored: set[str] = set()  # requests in a job that failed
        self.count = 0

    def _add(self, model: str, prompt: int, max_tokens: int, ignore_eos: bool, stop: int) -> None:
        rid = f"r{self.count}"
        self.count += 1
        req = make_request(
            rid,
            model,
            prompt=prompt,
            max_tokens=max_tokens,
            arrival=float(self.count),
            eos={EOS},
            ignore_eos=ignore_eos,
            stop_token_ids=(stop,),
        )
        before = (self.sched.pool.snapshot(), self.sched.pool.num_free, self.sched.stats())
        try:
            self.sched.add_request(req)
        except (PromptTooLongError, QueueFullError):
            assert (self.sched.pool.snapshot(), self.sched.pool.num_free, self.sched.stats()) == (
                before
            )
            assert self.sched.get(rid) is None
            return
        self.added[rid] = req
        self.asked[rid] = set()

    @rule(
        model=st.sampled_from("abc"),
        prompt=st.integers(1, 12),
        max_tokens=st.integers(1, 8),
        ignore_eos=st.booleans(),
        stop=st.integers(0, 90),
    )
    def add(self, model: str, prompt: int, max_tokens: int, ignore_eos: bool, stop: int) -> None:
        self._add(model, prompt, max_tokens, ignore_eos, stop)

    @rule(models=st.lists(st.sampled_from("abc"), min_size=2, max_size=5), size=st.integers(6, 18))
    def burst(self, models: list[str], size: int) -> None:
        """Long requests that outgrow the pool together: preemption, and quota contention."""
        for model in models:
            self._add(model, size, 6, True, 0)

    @rule(
        data=st.data(),
        reason=st.sampled_from([FinishReason.ABORT, FinishReason.STOP]),
    )
    def end_early(self, data: st.DataObject, reason: FinishReason) -> None:
        rid = data.draw(st.sampled_from([*sorted(self.added), "unknown"]))
        req = self.sched.finish(rid, reason)
        if req is None:
            assert rid == "unknown" or self.added[rid].is_finished
        else:
            self.asked[rid].add(reason)

    @rule(fail=st.integers(0, 5))
    def step(self, fail: int) -> None:
        self.runner.schedule()
        if self.runner.in_flight and fail == 0:
            self.errored.update(s.request_id for s in self.runner.in_flight[0].seqs)
            self.runner.complete(error="worker died")
        else:
            self.runner.complete()

    @rule()
    def schedule_only(self) -> None:
        self.runner.schedule()

    @invariant()
    def integrity(self) -> None:
        self.sched.check_integrity()
        assert self.sched.pool.num_free + sum(
            u for u, _ in self.sched.pool.snapshot().values()
        ) == (NUM_BLOCKS)

    def teardown(self) -> None:
        self.runner.drain()
        sched = self.sched
        assert not sched.has_work()
        assert sched.jobs_in_flight == 0
        assert sched.pool.num_free == NUM_BLOCKS
        assert sched.tables.holders() == 0
        for rid, req in self.added.items():
            assert req.is_finished, rid
            out = req.output_token_ids
            assert out == [step_token(rid, i) for i in range(len(out))], rid
            stops = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else {EOS})
            assert not stops & set(out[:-1]), rid  # it would have stopped there
            reason = req.finish_reason
            if reason is FinishReason.LENGTH:
                assert len(out) == req.params.max_tokens, rid
            elif reason is FinishReason.ERROR:
                assert rid in self.errored, rid
            elif reason is FinishReason.ABORT:
                assert FinishReason.ABORT in self.asked[rid], rid
            else:
                assert reason is FinishReason.STOP, rid
                assert FinishReason.STOP in self.asked[rid] or out[-1] in stops, rid


SETTINGS = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("kv_mode", ["unified", "static"])
@pytest.mark.parametrize("policy", ["adbs", "fcfs"])
def test_pool(policy: str, kv_mode: str) -> None:
    machine = type(
        f"Pool_{policy}_{kv_mode}", (PoolMachine,), {"policy": policy, "kv_mode": kv_mode}
    )
    machine.TestCase.settings = SETTINGS
    machine.TestCase().runTest()
