"""scripts/bench_elastic.py's bookkeeping: the three modes' configs, wake-time quantiles from the
meshes' histograms, models served per mesh, and medians with their spread."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from types import ModuleType

import pytest

from muxserve.config import parse_config
from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_elastic")


def args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "copies": 3,
        "meshes": 2,
        "fit": 1,
        "rate": 6.0,
        "duration": 20.0,
        "min_residency": 1.0,
        "replan_interval": 10.0,
        "replan_window": 5.0,
    }
    return argparse.Namespace(**{**base, **kw})


def test_configs_of_the_three_modes(bench: ModuleType, tmp_path: Path) -> None:
    a = args()
    models = bench.model_list(a.copies)
    names = [n for n, _ in models]
    assert names == [f"{b}-{k}" for b in ("llama-demo", "qwen-demo") for k in range(3)]
    spec = bench.spec_for("longtail", names, a, 0)
    rates = dict(zip(spec.models, spec.model_rates(), strict=True))
    top = sorted(names, key=lambda n: -rates[n])
    cluster = tmp_path / "c.json"

    static = bench.build_config("static", models, spec, a, cluster)
    assert [m["name"] for m in static["models"]] == top[:2]  # 1 fits per mesh, 2 meshes
    assert [[x["name"] for x in m["models"]] for m in static["meshes"]] == [[top[0]], [top[1]]]

    sleep = bench.build_config("sleep", models, spec, a, cluster)
    assert [[x["name"] for x in m["models"]] for m in sleep["meshes"]] == [names[:3], names[3:]]
    awake = {m["name"] for m in sleep["models"] if m["initial_state"] == "awake"}
    assert awake == {
        min(names[:3], key=lambda n: -rates[n]),
        min(names[3:], key=lambda n: -rates[n]),
    }
    budget = sleep["engine"]["residency"]["weights_budget_bytes"]
    assert budget == int(max(bench.weight_bytes(p) for _, p in models) * 1.05)
    assert "router" not in sleep

    replan = bench.build_config("replan", models, spec, a, cluster)
    mesh0 = replan["meshes"][0]["models"]
    assert [x["name"] for x in mesh0] == names[:3] + names[3:]  # home, then standby
    assert all(x.get("initial_state") == "asleep" for x in mesh0[3:])
    assert replan["router"]["replan"]["cluster"] == str(cluster)
    for raw in (static, sleep, replan):
        parse_config(raw)  # every one is a valid serving config


def test_wake_quantiles_from_the_histograms(bench: ModuleType) -> None:
    def bucket(le: float, n: float, mesh: str = "mesh-0") -> tuple[str, dict[str, str], float]:
        le_s = "+Inf" if math.isinf(le) else repr(le)
        return ("muxserve:model_wake_seconds_bucket", {"le": le_s, "mesh": mesh}, n)

    # mesh-0: 6 wakes <= 0.05 s, 8 <= 0.1 s; mesh-1: 2 wakes <= 0.1 s, 2 <= 1 s
    samples = [
        bucket(0.05, 6),
        bucket(0.1, 8),
        bucket(1.0, 8),
        bucket(math.inf, 8),
        bucket(0.05, 0, "mesh-1"),
        bucket(0.1, 0, "mesh-1"),
        bucket(1.0, 2, "mesh-1"),
        bucket(math.inf, 2, "mesh-1"),
    ]
    assert bench.wake_quantiles(samples) == {"wakes": 10, "p50_s": 0.05, "p99_s": 1.0}
    assert bench.wake_quantiles([]) == {"wakes": 0, "p50_s": None, "p99_s": None}


def test_models_per_mesh_and_medians(bench: ModuleType) -> None:
    config = {
        "models": [
            {"name": "a", "initial_state": "awake"},
            {"name": "b", "initial_state": "asleep"},
            {"name": "c", "initial_state": "asleep"},
        ],
        "meshes": [
            {"name": "mesh-0", "models": [{"name": "a"}, {"name": "b"}]},
            {"name": "mesh-1", "models": [{"name": "c"}, {"name": "a", "initial_state": "asleep"}]},
        ],
    }
    samples = [
        ("muxserve:model_wakes_total", {"mesh": "mesh-0", "model_name": "b"}, 3.0),
        ("muxserve:model_wakes_total", {"mesh": "mesh-1", "model_name": "a"}, 1.0),
        ("muxserve:model_wakes_total", {"mesh": "mesh-1", "model_name": "c"}, 0.0),
    ]
    assert bench.models_per_mesh(samples, config) == {"mesh-0": 2, "mesh-1": 1}
    assert bench.med([0.5, None, 0.9, 0.7]) == {"median": 0.7, "min": 0.5, "max": 0.9}
    assert bench.med([None]) == {"median": None, "min": None, "max": None}


def test_the_crowd_trace_moves_the_hot_set_onto_one_mesh(bench: ModuleType, tmp_path: Path):
    a = args(
        copies=2,
        crowd_hot=2,
        crowd_warm=0.25,
        crowd_prompt="uniform:16:32",
        crowd_output="uniform:8:16",
        rate=4.0,
        duration=20.0,
    )
    models = bench.model_list(a.copies)
    names = [n for n, _ in models]  # llama-demo-0, -1 on mesh-0; qwen-demo-0, -1 on mesh-1
    assert bench.crowd_sets(names, 2, 2) == (
        ["llama-demo-0", "qwen-demo-0"],  # one per mesh
        ["llama-demo-0", "llama-demo-1"],  # both on mesh-0
    )
    with pytest.raises(ValueError, match="--crowd-hot 3: mesh-0 holds only 2 models"):
        bench.crowd_sets(names, 2, 3)
    entries, meta, planned = bench.crowd_trace(names, a, 0, None)
    assert planned == {
        "llama-demo-0": 2.0,
        "qwen-demo-0": 2.0,
        "llama-demo-1": 0.0,
        "qwen-demo-1": 0.0,
    }
    assert meta["warm_s"] == 5.0 and meta["requests"] == len(entries)
    assert {e.model for e in entries if e.arrival_s < 5.0} <= {"llama-demo-0", "qwen-demo-0"}
    assert {e.model for e in entries if e.arrival_s >= 5.0} == {"llama-demo-0", "llama-demo-1"}
    assert [e.arrival_s for e in entries] == sorted(e.arrival_s for e in entries)
    cluster = tmp_path / "c.json"
    configs = {m: bench.build_crowd_config(m, models, planned, a, cluster) for m in bench.MODES}
    for mode, raw in configs.items():
        assert [[x["name"] for x in m["models"]] for m in raw["meshes"]] == [
            names[:2],
            names[2:],
        ], mode
        parse_config(raw)
    assert "weights_budget_bytes" not in configs["static"]["engine"]["residency"]
    budget = int(3 * max(bench.weight_bytes(p) for _, p in models) * 1.05)
    assert configs["sleep"]["engine"]["residency"]["weights_budget_bytes"] == budget
    assert "router" not in configs["sleep"]
    assert configs["replan"]["router"]["replan"]["add_models"] is True
