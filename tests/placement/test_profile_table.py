from __future__ import annotations

import json
from pathlib import Path

import pytest

from muxserve.errors import ConfigError
from placement.cost_model import AnalyticCostModel, ProfiledCostModel
from placement.profile_table import interp, load_profile
from tests.helpers.placement import gpu, spec


def table(path: Path, model: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "format": "muxserve-profile/1",
                "gpu": "TestGPU",
                "entries": [
                    {
                        "model": model,
                        "tp": 1,
                        "sm": 1.0,
                        "phase": "prefill",
                        "tokens": [100, 200],
                        "latency_s": [0.01, 0.03],
                    },
                    {
                        "model": model,
                        "tp": 1,
                        "sm": 0.5,
                        "phase": "decode",
                        "batch": [1, 9],
                        "context": [100, 300],
                        "latency_s": [[0.010, 0.012], [0.018, 0.030]],
                    },
                    {
                        "model": model,
                        "tp": 1,
                        "sm": 1.0,
                        "phase": "decode",
                        "batch": [1, 9],
                        "context": [100, 300],
                        "latency_s": [[0.005, 0.006], [0.009, 0.015]],
                    },
                ],
            }
        )
    )
    return path


def test_interp() -> None:
    assert interp([1, 3], [10, 30], 2) == 20
    assert interp([1, 3], [10, 30], 0) == 10  # clamped below
    assert interp([1, 3], [10, 30], 5) == 50  # extrapolated past the last point
    assert interp([4], [7], 100) == 7


def test_lookup(tmp_path: Path) -> None:
    s = spec()
    t = load_profile(table(tmp_path / "t.json", s.arch_key))

    def analytic(sm: float) -> float:
        return 1.0 / sm

    assert t.prefill(s.arch_key, 1, 1.0, 150, analytic) == pytest.approx(0.02)
    assert t.prefill(s.arch_key, 2, 1.0, 150, analytic) is None  # no tp=2 entry
    assert t.prefill("other", 1, 1.0, 150, analytic) is None
    # bilinear in (batch, context)
    assert t.decode(s.arch_key, 1, 1.0, 5, 200, analytic) == pytest.approx((0.0055 + 0.012) / 2)
    # between profiled shares, linear in 1/share: 1/0.75 is 2/3 of the way from 1/1 to 1/0.5
    at_half, at_one = 0.010, 0.005
    assert t.decode(s.arch_key, 1, 0.75, 1, 100, analytic) == pytest.approx(
        at_one + (1 / 0.75 - 1) / (1 / 0.5 - 1) * (at_half - at_one)
    )
    # below the least share: scaled by the analytic ratio
    assert t.decode(s.arch_key, 1, 0.25, 1, 100, analytic) == pytest.approx(at_half * 2)


def test_profiled_cost_model_falls_back(tmp_path: Path) -> None:
    s = spec()
    g = gpu()
    cm = ProfiledCostModel(g, load_profile(table(tmp_path / "t.json", s.arch_key)))
    assert cm.prefill_latency(s, 1, 1.0, 1, 150) == pytest.approx(0.02)
    assert cm.prefill_latency(s, 2, 1.0, 1, 150) == AnalyticCostModel(g).prefill_latency(
        s, 2, 1.0, 1, 150
    )


def test_bad_tables(tmp_path: Path) -> None:
    f = tmp_path / "t.json"
    f.write_text("{not json")
    with pytest.raises(ConfigError, match=r"t\.json: malformed JSON at line 1"):
        load_profile(f)
    f.write_text(
        json.dumps(
            {
                "format": "muxserve-profile/1",
                "gpu": "x",
                "entries": [
                    {
                        "model": "m",
                        "tp": 1,
                        "sm": 1.0,
                        "phase": "prefill",
                        "tokens": [2, 1],
                        "latency_s": [1, 2],
                    }
                ],
            }
        )
    )
    with pytest.raises(ConfigError, match=r"t\.json: entries\.0\.prefill: .*strictly increasing"):
        load_profile(f)
    with pytest.raises(ConfigError, match="no such profile table"):
        load_profile(tmp_path / "missing.json")
