"""One mps engine for the executor tests: worker processes cost seconds each to start."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.engine import MuxEngine
from tests.helpers.mps import SHARES, SHM, mps_config


@pytest.fixture(scope="session")
def shm_before() -> set[str]:
    """/dev/shm before the first mps engine: anything new after shutdown is a leak."""
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


@pytest.fixture(scope="session")
def mps_engine(demo_models: dict[str, Path], shm_before: set[str]) -> MuxEngine:
    """Shared by test_mps_engine.py and test_mps_faults.py; shut down at the end of the session."""
    eng = MuxEngine(mps_config(demo_models, sm_share=SHARES))
    yield eng
    eng.shutdown()
