"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from muxserve.demo import ensure_demo_models
from muxserve.engine import AUTO_DEVICE_ENV

# The CPU suite runs on the CPU on a GPU machine too: `engine.device: auto`, the default of the
# configs the tests build, means cpu in this process and in every process the tests start (TP
# stays on gloo, MPS starts no daemon). The GPU suite (tests/gpu) names its device.
os.environ.setdefault(AUTO_DEVICE_ENV, "cpu")

# Every process the tests start (scripts, mesh processes, Ray workers) imports `muxserve` from
# this checkout, whatever other copy of the package is installed.
ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    """The three demo checkpoints (name -> folder), built once into `$MUXSERVE_CACHE/demo-models`.

    The default cache (`~/.cache/muxserve`) persists, so only the first run pays for the build.
    """
    return ensure_demo_models()
