"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.demo import ensure_demo_models


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    """The three demo checkpoints (name -> folder), built once into `$MUXSERVE_CACHE/demo-models`.

    The default cache (`~/.cache/muxserve`) persists, so only the first run pays for the build.
    """
    return ensure_demo_models()
