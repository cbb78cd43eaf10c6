"""The mps executor on a GPU (issue 16, Part B 2): CUDA IPC of weights and pool into MPS
clients gives the same greedy tokens as the inline executor, the daemon starts and stops
cleanly, and decode at a 30% share is measurably slower than at 100%.

Each engine runs in its own fresh process (tests/gpu/mps_child.py): this pytest process has
initialised CUDA, and MPS only attaches a process at CUDA's first initialisation. The model is
the Llama-7B architecture cut to 8 layers (random bf16 weights, ~3.7 GB, written once under
`$MUXSERVE_CACHE/gpu-tests/`): large enough that a decode step is bound by the GPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from muxserve.config import default_cache_dir
from muxserve.models.llama import parameter_shapes
from tests.gpu.conftest import LLAMA_7B, Report, llama_7b_config

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

LAYERS = 8
CHILD = Path(__file__).with_name("mps_child.py")
CHILD_TIMEOUT_S = 600
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def checkpoint(demo_models: dict[str, Path], device: torch.device) -> Path:
    folder = default_cache_dir() / "gpu-tests" / f"llama-7b-{LAYERS}l-random-bf16"
    if (folder / "complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((LLAMA_7B / "config.json").read_text())
    config.update(torch_dtype="bfloat16", num_hidden_layers=LAYERS)
    (folder / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(demo_models["llama-demo"] / name, folder / name)
    shapes = parameter_shapes(llama_7b_config())
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= LAYERS:
            continue
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, device=device).normal_(0, 0.02, generator=gen)
            tensors[name] = t.to(torch.bfloat16).cpu()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "complete").touch()
    return folder


def child(checkpoint: Path, executor: str, share: float) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, str(CHILD), str(checkpoint), executor, str(share)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["errors"] == [], out["errors"]
    return out


def test_mps_ipc_daemon_and_shares(checkpoint: Path, report: Report) -> None:
    if shutil.which("nvidia-cuda-mps-control") is None:
        pytest.skip("nvidia-cuda-mps-control is not on PATH")
    inline = child(checkpoint, "inline", 1.0)
    full = child(checkpoint, "mps", 1.0)
    part = child(checkpoint, "mps", 0.3)
    report(
        "mps",
        inline_tokens_per_s=inline["tokens_per_s"],
        mps_full_tokens_per_s=full["tokens_per_s"],
        mps_30pct_tokens_per_s=part["tokens_per_s"],
        ratio_30pct_vs_full=part["tokens_per_s"] / full["tokens_per_s"],
        same_first_tokens=full["first_tokens"] == inline["first_tokens"],
    )
    # weights and pool reach the workers by CUDA IPC: the same greedy tokens as in-process
    assert full["first_tokens"] == inline["first_tokens"]
    assert full["daemon_dir_left"] is False and part["daemon_dir_left"] is False
    assert part["tokens_per_s"] < 0.85 * full["tokens_per_s"]
