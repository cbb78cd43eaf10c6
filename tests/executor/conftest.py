"""One mps engine for the executor tests: worker processes cost seconds each to start."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.config import MuxConfig, parse_config
from muxserve.engine import MuxEngine
from tests.helpers.engine import make_config

SHM = Path("/dev/shm")
# shares that let jobs of different models run at once (at most 100% + 10% in total)
SHARES = {"prefill": 0.5, "decode": 0.3}


def mps_config(demo_models: dict[str, Path]) -> MuxConfig:
    """tests/test_engine.py's config with the mps executor and SM shares below 100%."""
    raw = make_config(demo_models, executor="mps").model_dump()
    for m in raw["models"]:
        m["sm_share"] = SHARES
    return parse_config(raw)


@pytest.fixture(scope="session")
def shm_before() -> set[str]:
    """/dev/shm before the first mps engine: anything new after shutdown is a leak."""
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


@pytest.fixture(scope="session")
def mps_engine(demo_models: dict[str, Path], shm_before: set[str]) -> MuxEngine:
    """Shared by test_mps_engine.py and test_mps_faults.py; shut down at the end of the session."""
    eng = MuxEngine(mps_config(demo_models))
    yield eng
    eng.shutdown()
