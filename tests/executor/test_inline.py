"""The inline executor behind the submit/poll interface, and the CPU share arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from muxserve.executor.base import cpu_threads, create_executor
from muxserve.executor.inline import InlineExecutor
from tests.helpers.executor import SIZING, decode_job, make_spec, prefill_job

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def inline(demo_models: dict[str, Path]) -> InlineExecutor:
    specs = [make_spec(n, p) for n, p in demo_models.items() if n != "mistral-demo"]
    ex = create_executor("inline", specs, SIZING, CPU)
    assert isinstance(ex, InlineExecutor)
    return ex


def test_poll_with_nothing_in_flight_is_empty(inline):
    assert inline.poll(5.0) == []


def test_submit_then_poll_returns_each_job_once(demo_models, inline):
    llama = make_spec("llama-demo", demo_models["llama-demo"])
    qwen = make_spec("qwen-demo", demo_models["qwen-demo"])
    jobs = [prefill_job(0, llama, [5, 6, 7], "a", 0), prefill_job(1, qwen, [9, 8], "b", 64)]
    inline.submit(jobs)
    results = inline.poll(0.0)
    assert [j.job_id for j, _ in results] == [0, 1]
    assert all(r.error is None and r.outputs[0].token_id is not None for _, r in results)
    assert inline.poll(0.0) == []
    # the next job of a model goes on from where its last one left the pool
    first = results[0][1].outputs[0].token_id
    inline.submit([decode_job(2, llama, jobs[0], first, 1)])
    [(job, result)] = inline.poll(0.0)
    assert job.job_id == 2 and result.outputs[0].request_id == "a"


def test_tensor_parallel_needs_worker_processes(demo_models):
    spec = make_spec("llama-demo", demo_models["llama-demo"], tp=2)
    with pytest.raises(ValueError, match="executor: mps"):
        create_executor("inline", [spec], SIZING, CPU)


def test_unknown_executor(demo_models):
    with pytest.raises(ValueError, match="unknown executor 'ray'"):
        create_executor("ray", [], SIZING, CPU)


@pytest.mark.parametrize(
    "share,cores,threads", [(1.0, 16, 16), (0.5, 16, 8), (0.3, 16, 5), (0.01, 2, 1), (0.5, 2, 1)]
)
def test_cpu_threads_follow_the_share(share, cores, threads):
    assert cpu_threads(share, cores) == threads


class StubGraphs:
    """Stands in for DecodeGraphs on a CPU: records warm-ups; every job runs eagerly."""

    def __init__(self) -> None:
        self.warm_ups = 0

    def warm_up(self) -> list[object]:
        self.warm_ups += 1
        return []

    def run(self, seqs: object, tables: object = None, fresh: object = ()) -> None:
        return None


def test_a_wake_captures_the_decode_graphs_at_once(demo_models, monkeypatch):
    from muxserve.runner import model_runner

    spec = make_spec("llama-demo", demo_models["llama-demo"])
    ex = create_executor("inline", [spec], SIZING, CPU)
    assert isinstance(ex, InlineExecutor)
    runner = ex.runners["llama-demo"]
    assert runner.graphs is None  # a CPU has none
    made: list[StubGraphs] = []

    def create(*args: object, **kw: object) -> StubGraphs:
        made.append(StubGraphs())
        return made[-1]

    monkeypatch.setattr(model_runner.DecodeGraphs, "create", create)
    for level in (1, 2):
        ex.sleep_model("llama-demo", level)
        assert runner.graphs is None  # they held the old weights' addresses
        ex.wake_model("llama-demo")
        assert runner.graphs is made[-1] and made[-1].warm_ups == 1  # captured in the wake
    assert len(made) == 2
    job = prefill_job(0, spec, [5, 6, 7], "a", 0)
    ((_, result),) = ex.run([job])
    assert result.error is None
    ex.shutdown()
