"""Sleep and wake on a GPU: level 1 moves the weights to pinned host memory and frees the
device's, level 2 drops them; both come back bit for bit, with the same greedy output; a wake
prints its time. `pytest -m gpu tests/gpu/test_sleep_wake.py -s`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from muxserve.config import parse_config
from muxserve.engine import MuxEngine
from muxserve.residency import ModelState
from muxserve.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
PROMPTS = [[5, 6, 7, 8, 9, 10], list(range(20, 90))]


@pytest.fixture(scope="module")
def engine(demo_models: dict[str, Path]):
    config = parse_config(
        {
            "models": [{"name": n, "path": str(p)} for n, p in demo_models.items()],
            "engine": {"device": "cuda", "kv_pool_bytes": 64 << 20},
        }
    )
    eng = MuxEngine(config)
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_the_device_and_wake_restores_it_bit_for_bit(engine, level):
    model = "mistral-demo"
    runner = engine.executor.runners[model]
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    want = [c.token_ids for c in engine.generate(PROMPTS, GREEDY, model)]
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    engine.sleep(model, level)
    freed = allocated - torch.cuda.memory_allocated()
    assert freed >= engine.executor.weight_bytes(model), (freed, level)
    if level == 1:
        params = list(runner._model.parameters())
        assert all(p.device.type == "cpu" and p.is_pinned() for p in params)
    took = engine.wake(model)
    print(f"\n{model}: level {level} wake {took * 1000:.2f} ms, freed {freed / 2**20:.1f} MiB")
    assert engine.model_states()[model] is ModelState.AWAKE
    after = runner.model.state_dict()
    assert all(torch.equal(after[k].cpu(), before[k].cpu()) for k in before)
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY, model)] == want
    engine.check_integrity()
