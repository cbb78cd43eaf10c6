from __future__ import annotations

import json
from pathlib import Path

import pytest

from placement.cost_model import ProfiledCostModel
from placement.profile_table import load_profile
from placement.specs import load_models
from tests.helpers.placement import gpu, llama_config

torch = pytest.importorskip("torch")


def test_profiler_writes_a_table_the_cost_model_reads(tmp_path: Path) -> None:
    from placement.profiler import main

    ckpt = tmp_path / "tiny"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(llama_config(hidden=64, layers=2, heads=4)))
    models = tmp_path / "m.yaml"
    models.write_text("models: [{name: a, path: tiny, dtype: float32}, {name: b, path: tiny}]\n")
    out = tmp_path / "t.json"
    assert (
        main(["--models", str(models), "--out", str(out), "--device", "cpu", "--gpu", "cpu"]) == 0
    )
    table = json.loads(out.read_text())
    assert table["format"] == "muxserve-profile/1"
    # a and b differ in dtype (float32, float16): two architectures, two entries each
    assert [(e["phase"], e["sm"]) for e in table["entries"]] == [
        ("prefill", 1.0),
        ("decode", 1.0),
    ] * 2
    spec = load_models(models).specs[0]
    cm = ProfiledCostModel(gpu(), load_profile(out))
    assert cm.prefill_latency(spec, 1, 1.0, 1, 128) == pytest.approx(
        table["entries"][0]["latency_s"][0]
    )
    assert cm.decode_latency(spec, 1, 1.0, 1, 128) > 0
