"""Fixtures of the tensor-parallel tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zoo_models() -> dict[str, Path]:
    """One tiny checkpoint per family (tests/zoo.py), built once into the cache."""
    pytest.importorskip("transformers")
    import zoo

    return zoo.ensure_zoo_models()
