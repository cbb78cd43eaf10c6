"""Fixtures for runner tests: the demo checkpoints, built once per session into a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.demo import ensure_demo_models


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> folder of each demo model (seeded, so identical on every machine)."""
    return ensure_demo_models(tmp_path_factory.mktemp("demo-models"))
