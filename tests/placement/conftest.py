"""Fixtures for the placement tests (the factories are in tests/helpers/placement.py)."""

from __future__ import annotations

import pytest

from placement.problem import Problem
from tests.helpers.placement import CONFIGS


@pytest.fixture
def paper_problem() -> Problem:
    """The paper's 19 models on 4 × 8 A100-80GB at α = 0.9 (committed configs)."""
    from placement.problem import load_problem

    return load_problem(
        CONFIGS / "models" / "paper-19.yaml",
        CONFIGS / "clusters" / "paper-4x8-a100-80gb.yaml",
        CONFIGS / "workloads" / "paper-alpha0.9.yaml",
    )
