"""A model added to a running engine (asleep, woken by its first request) and a drained one
removed: the same greedy text as an engine that served it from the start, no KV left behind,
and clear refusals (a name served already, a model over the whole budget, a busy or awake
model, the last model, an executor that cannot)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from muxserve import roster
from muxserve.client.protocol import ModelState
from muxserve.config import ModelEntry, parse_config
from muxserve.engine import MuxEngine
from muxserve.errors import ModelBusyError, ModelDoesNotFitError, UnknownModelError
from muxserve.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3, 99, 42]]
LLAMA, QWEN = "llama-demo", "qwen-demo"


def engine_of(demo: dict[str, Path], names: list[str], **engine: object) -> MuxEngine:
    return MuxEngine(
        parse_config(
            {
                "models": [{"name": n, "path": str(demo[n])} for n in names],
                "engine": {"kv_pool_bytes": 4 << 20, "block_bytes": 4096, **engine},
            }
        )
    )


def entry(demo: dict[str, Path], name: str) -> ModelEntry:
    return ModelEntry(name=name, path=str(demo[name]), rate=2.0)


def tokens(engine: MuxEngine, model: str) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(PROMPTS, GREEDY, model)]


def test_an_added_model_serves_the_same_text_and_a_removed_one_is_gone(demo_models):
    ref = engine_of(demo_models, [LLAMA, QWEN])
    try:
        want = {m: tokens(ref, m) for m in (LLAMA, QWEN)}
    finally:
        ref.shutdown()
    eng = engine_of(demo_models, [LLAMA])
    try:
        served = eng.add_model(entry(demo_models, QWEN))
        assert served.name == QWEN and list(eng.models) == [LLAMA, QWEN]
        assert eng.model_states() == {LLAMA: ModelState.AWAKE, QWEN: ModelState.ASLEEP}
        assert eng.stats()[QWEN].blocks_quota == 0
        assert tokens(eng, QWEN) == want[QWEN]  # its first request woke it
        assert tokens(eng, LLAMA) == want[LLAMA]
        assert eng.model_states()[QWEN] is ModelState.AWAKE
        with pytest.raises(ValueError, match="qwen-demo' is awake: put it to sleep first"):
            eng.remove_model(QWEN)
        eng.sleep(QWEN, 1)
        eng.remove_model(QWEN)
        assert list(eng.models) == [LLAMA] and list(eng.stats()) == [LLAMA]
        assert QWEN not in eng.model_states()
        assert QWEN not in eng.executor.runners  # type: ignore[attr-defined]
        assert [m.name for m in eng.config.models] == [LLAMA]
        with pytest.raises(UnknownModelError, match="qwen-demo"):
            eng.add_request(QWEN, PROMPTS[0], GREEDY)
        assert tokens(eng, LLAMA) == want[LLAMA]
        assert eng.snapshot().blocks_free == eng.snapshot().blocks_total
        eng.check_integrity()
        # and back again, the same
        eng.add_model(entry(demo_models, QWEN))
        assert eng.wake(QWEN) > 0.0
        assert tokens(eng, QWEN) == want[QWEN]
        eng.check_integrity()
    finally:
        eng.shutdown()


def test_bad_additions_and_removals_are_refused_clearly(demo_models):
    eng = engine_of(demo_models, [LLAMA], residency={"weights_budget_bytes": 4 << 20})
    try:
        with pytest.raises(ValueError, match="'llama-demo' is served here already"):
            eng.add_model(entry(demo_models, LLAMA))
        with pytest.raises(ModelDoesNotFitError, match="'mistral-demo' does not fit") as e:
            eng.add_model(entry(demo_models, "mistral-demo"))  # 6.8 MiB > the whole 4 MiB
        assert (e.value.free_bytes, e.value.held_by) == (4 << 20, {})
        assert list(eng.models) == [LLAMA]
        with pytest.raises(UnknownModelError):
            eng.remove_model(QWEN)
        with pytest.raises(ValueError, match="last model here"):
            eng.sleep(LLAMA, 2)
            eng.remove_model(LLAMA)
        eng.add_model(entry(demo_models, QWEN))
        eng.add_request(QWEN, PROMPTS[0], GREEDY)  # waits (no loop runs): busy
        with pytest.raises(ModelBusyError, match="qwen-demo"):
            eng.remove_model(QWEN)
        eng.check_integrity()
    finally:
        eng.shutdown()


def test_an_executor_that_cannot_change_its_models_says_so(demo_models):
    # inline and mps both can (tests/executor/test_mps_roster.py); a third one may not
    stand_in = cast(MuxEngine, SimpleNamespace(executor=object()))
    with pytest.raises(ValueError, match=r"executor that can \(inline or mps\).*object cannot"):
        roster.add_model(stand_in, entry(demo_models, QWEN))
    with pytest.raises(ValueError, match="object cannot"):
        roster.remove_model(stand_in, QWEN)
