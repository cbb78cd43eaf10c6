from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from muxserve.cli import main
from muxserve.config import load_config
from tests.helpers.placement import CONFIGS, ROOT

PAPER = [
    "--models",
    str(CONFIGS / "models" / "paper-19.yaml"),
    "--cluster",
    str(CONFIGS / "clusters" / "paper-4x8-a100-80gb.yaml"),
]


def test_import_is_torch_free() -> None:
    code = "import placement, placement.cli, sys; assert 'torch' not in sys.modules"
    env_path = f"{ROOT}"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": env_path, "PATH": ""}
    )


def test_plan_all_writes_a_serving_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plan.yaml"
    wl = str(CONFIGS / "workloads" / "paper-alpha2.1.yaml")
    rc = main(["plan", *PAPER, "--workload", wl, "--algorithm", "all", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("ilp", "greedy", "muxserve", "spatial", "temporal"):
        assert f"== {name}: " in text
    assert "algorithm   est req/s  x spatial" in text
    cfg = load_config(out)
    assert cfg.meshes and len(cfg.models) == 19


def test_simulate_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    wl = str(CONFIGS / "workloads" / "paper-alpha2.1.yaml")
    png = tmp_path / "p.png"
    argv = [
        "plan",
        *PAPER,
        "--workload",
        wl,
        "--algorithm",
        "greedy",
        "--simulate",
        "--duration",
        "4",
        "--contention",
        "start",
        "--plot",
        str(png),
    ]
    assert main(argv) == 0
    assert "simulated: " in capsys.readouterr().out
    assert png.exists()


def test_overload_names_the_under_served(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    wl = tmp_path / "w.yaml"
    rates = "".join(f"  - {{name: llm-{i}, rate: {400 if i == 0 else 1}}}\n" for i in range(19))
    wl.write_text("models:\n" + rates)
    assert main(["plan", *PAPER, "--workload", str(wl), "--algorithm", "ilp"]) == 0
    assert "under-served: llm-0 (" in capsys.readouterr().out


def test_bad_input_is_an_error_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    wl = tmp_path / "w.yaml"
    wl.write_text("models:\n  - {name: llm-0, rate: fast}\n")
    assert main(["plan", *PAPER, "--workload", str(wl)]) == 2
    err = capsys.readouterr().err
    assert "muxserve plan: error: " in err and "w.yaml: models.0.rate: " in err
    wl.write_text("models: [\n")
    assert main(["plan", *PAPER, "--workload", str(wl)]) == 2
    assert "w.yaml: malformed YAML at line 2" in capsys.readouterr().err


def test_model_too_big_for_the_cluster(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    models = tmp_path / "m.yaml"
    models.write_text(f"models: [{{name: big, path: {CONFIGS / 'models' / 'llama-65b'}}}]\n")
    cl = tmp_path / "c.yaml"
    cl.write_text("gpu: L40S\nnodes: 2\ngpus_per_node: 2\n")
    wl = tmp_path / "w.yaml"
    wl.write_text("models: [{name: big, rate: 1}]\n")
    argv = ["plan", "--models", str(models), "--cluster", str(cl), "--workload", str(wl)]
    assert main(argv) == 2
    assert "model 'big' fits on no mesh of this cluster" in capsys.readouterr().err
