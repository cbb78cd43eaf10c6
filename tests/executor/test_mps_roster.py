"""A model added to a running mps engine and removed again (issue 15), pooled and per-model:
asleep it holds no process and no weights in a worker; woken it gives HF's greedy tokens (a
pooled wake returns only once the worker has built it); removed, no process, mirror or
worker-held weights of it are left; and roster's refusals (a name served already, an awake or
busy model, a tensor-parallel model) are the same clear errors as with the inline executor.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from muxserve.config import ModelEntry, MuxConfig, SMShare
from muxserve.engine import MuxEngine
from muxserve.errors import ModelBusyError, WorkerFailedError
from muxserve.executor.base import ModelSpec, cpu_threads
from muxserve.executor.messages import Attach
from muxserve.executor.mps import MpsExecutor
from muxserve.executor.worker_pool import PooledWorker
from muxserve.models.causal_lm import CausalLM
from muxserve.residency import ModelState
from muxserve.scheduler.job import Phase
from tests.helpers.engine import GREEDY, hf_greedy, prompts_for
from tests.helpers.mps import mps_config, mps_engine_of, streamed, tokens_of
from tests.helpers.wait import wait_until

LLAMA, QWEN, MISTRAL = "llama-demo", "qwen-demo", "mistral-demo"
HALF = SMShare(prefill=0.5, decode=0.5)  # another share class than the default (1.0) on CPUs


def config_of(demo: dict[str, Path], pool: str) -> MuxConfig:
    """llama-demo alone, on `pool` workers: the others are added while it serves."""
    return mps_config(demo, LLAMA, worker_pool=pool)


def entry(demo: dict[str, Path], name: str, share: SMShare | None = None) -> ModelEntry:
    return ModelEntry(name=name, path=str(demo[name]), rate=1.0, sm_share=share or SMShare())


def check_tokens(engine: MuxEngine, demo: dict[str, Path], model: str) -> None:
    prompts = prompts_for(model)[:2]
    got = [o.token_ids for o in engine.generate(prompts, GREEDY, model)]
    assert got == [list(t) for t in hf_greedy(model, demo[model])[:2]], model


def pids(executor: MpsExecutor) -> set[int]:
    return {p for ps in executor.worker_pids().values() for p in ps}


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def held(executor: MpsExecutor) -> dict[str, list[str]]:
    return {label: [n for n, _ in r.models] for label, r in executor.worker_report().items()}


def test_a_model_added_to_pooled_workers_attaches_on_wake_and_leaves_nothing_when_removed(
    demo_models: dict[str, Path],
) -> None:
    with mps_engine_of(config_of(demo_models, "shared")) as (eng, ex):
        before = pids(ex)
        assert len(before) == 2  # one prefill, one decode worker
        labels = sorted(held(ex))
        eng.add_model(entry(demo_models, QWEN))  # the running workers' class
        assert held(ex) == {label: [LLAMA] for label in labels}  # asleep: nothing attached
        assert eng.wake(QWEN) > 0.0
        units = [ex.groups[(QWEN, p)] for p in Phase]
        assert all(isinstance(u, PooledWorker) and not u.attaching(QWEN) for u in units)
        assert pids(ex) == before  # attached to the running workers: no process started
        assert held(ex) == {label: [LLAMA, QWEN] for label in labels}
        check_tokens(eng, demo_models, QWEN)
        with pytest.raises(ValueError, match="'qwen-demo' is served here already"):
            eng.add_model(entry(demo_models, QWEN))
        with pytest.raises(ValueError, match="qwen-demo' is awake: put it to sleep first"):
            eng.remove_model(QWEN)
        eng.sleep(QWEN, 1)
        eng.remove_model(QWEN)
        assert held(ex) == {label: [LLAMA] for label in labels}
        assert pids(ex) == before and all(u.mirrors_of(QWEN) == [] for u in units)
        assert {m for m, _ in ex.worker_pids()} == {LLAMA}

        # a share class with no worker yet: its wake starts one per phase, its removal stops them
        new_class = cpu_threads(HALF.decode) != cpu_threads(1.0)
        eng.add_model(entry(demo_models, MISTRAL, HALF))
        assert pids(ex) == before  # nothing starts while it sleeps
        eng.wake(MISTRAL)
        assert len(pids(ex)) == 2 + (2 if new_class else 0)
        names = sorted(n for ns in held(ex).values() for n in ns)
        assert names == [LLAMA, LLAMA, MISTRAL, MISTRAL]  # in its own workers or the old ones
        check_tokens(eng, demo_models, MISTRAL)
        check_tokens(eng, demo_models, LLAMA)
        started = pids(ex) - before
        eng.sleep(MISTRAL, 2)
        eng.remove_model(MISTRAL)
        assert pids(ex) == before and not [p for p in started if alive(p)]
        assert held(ex) == {label: [LLAMA] for label in labels}

        eng.add_model(entry(demo_models, QWEN))
        eng.add_request(QWEN, prompts_for(QWEN)[0], GREEDY)  # waits (no loop runs): busy
        with pytest.raises(ModelBusyError, match="qwen-demo"):
            eng.remove_model(QWEN)
        eng.check_integrity()
    assert not [p for p in before if alive(p)]


def streamed_tokens(engine: MuxEngine, rids: list[str]) -> list[list[int]]:
    """Each request's tokens, read from its stream (the engine's loop runs them)."""
    outs = streamed(engine, rids)
    assert [out[-1].error for out in outs] == [None] * len(rids)
    return [tokens_of(out) for out in outs]


def test_a_wake_attaches_while_another_model_runs_on_the_same_worker(
    demo_models: dict[str, Path],
) -> None:
    """The wake returns once the worker built the model (read by the loop's poll, or by the
    waking thread between polls), while llama's jobs on the same workers go on."""
    with mps_engine_of(config_of(demo_models, "shared")) as (eng, ex):
        eng.add_model(entry(demo_models, QWEN))
        eng.start()
        rids = [eng.add_request(LLAMA, p, GREEDY) for p in prompts_for(LLAMA)[:2]]
        unit = ex.groups[(LLAMA, Phase.DECODE)]
        wait_until(lambda: unit.delivered, 60.0, "a llama decode job in flight")
        assert eng.wake(QWEN) > 0.0
        units = [ex.groups[(QWEN, p)] for p in Phase]
        assert all(isinstance(u, PooledWorker) and not u.attaching(QWEN) for u in units)
        qwen = [eng.add_request(QWEN, p, GREEDY) for p in prompts_for(QWEN)[:2]]
        want = {m: [list(t) for t in hf_greedy(m, demo_models[m])[:2]] for m in (LLAMA, QWEN)}
        assert streamed_tokens(eng, rids) == want[LLAMA]
        assert streamed_tokens(eng, qwen) == want[QWEN]
        wait_until(lambda: eng.scheduler.jobs_in_flight == 0, 60.0, "idle")
        eng.check_integrity()


def test_a_model_added_with_its_own_workers_starts_them_on_wake_and_stops_them_on_sleep(
    demo_models: dict[str, Path],
) -> None:
    with mps_engine_of(config_of(demo_models, "per_model")) as (eng, ex):
        before = pids(ex)
        assert len(before) == 2
        eng.add_model(entry(demo_models, QWEN))
        assert ex.worker_pids()[(QWEN, Phase.PREFILL)] == [] and pids(ex) == before
        assert eng.wake(QWEN) > 0.0
        mine = {p for ph in Phase for p in ex.worker_pids()[(QWEN, ph)]}
        assert len(mine) == 2 and pids(ex) == before | mine  # eager: started by the wake
        check_tokens(eng, demo_models, QWEN)
        with pytest.raises(ValueError, match="qwen-demo' is awake: put it to sleep first"):
            eng.remove_model(QWEN)
        eng.sleep(QWEN, 2)
        eng.remove_model(QWEN)
        assert pids(ex) == before and not [p for p in mine if alive(p)]
        assert {m for m, _ in ex.worker_pids()} == {LLAMA}
        check_tokens(eng, demo_models, LLAMA)
        spec = next(s for s in ex.specs if s.name == LLAMA)
        with pytest.raises(ValueError, match="tp2: tensor_parallel=2 cannot be added"):
            ex.add_model(replace(spec, name="tp2", tensor_parallel=2))
        eng.check_integrity()
    assert not [p for p in before if alive(p)]


def test_a_wake_the_workers_cannot_build_fails_and_leaves_the_model_asleep(
    demo_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import muxserve.executor.mps_roster as mps_roster

    with mps_engine_of(config_of(demo_models, "shared")) as (eng, ex):
        labels = sorted(held(ex))
        eng.add_model(entry(demo_models, QWEN))
        real = mps_roster.attach_of

        def broken(spec: ModelSpec, model: CausalLM) -> Attach:
            a = real(spec, model)  # a layout whose blocks are not the pool's: the build raises
            return replace(a, layout=replace(a.layout, block_bytes=2 * a.layout.block_bytes))

        monkeypatch.setattr(mps_roster, "attach_of", broken)
        with pytest.raises(
            WorkerFailedError,
            match=r"qwen-demo: its workers could not build it.*"
            r"layout block_bytes 8192 != the pool's 4096",
        ):
            eng.wake(QWEN)
        assert eng.model_states()[QWEN] is ModelState.ASLEEP
        assert held(ex) == {label: [LLAMA] for label in labels}  # nothing of it held
        monkeypatch.setattr(mps_roster, "attach_of", real)
        eng.wake(QWEN)  # the same wake, with a message the workers can build
        check_tokens(eng, demo_models, QWEN)
        check_tokens(eng, demo_models, LLAMA)  # the other model was served throughout
        eng.check_integrity()
