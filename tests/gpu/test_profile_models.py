"""scripts/profile_models.py: the grid it plans (on any machine), its refusals, and (on a GPU)
a small profile that placement's loader reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from placement.profile_table import load_profile
from tests.helpers.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "profile_models.py"
LLAMA_7B = str(REPO / "configs" / "models" / "llama-7b")
ARCH_7B = "LlamaForCausalLM-h4096-i11008-l32-a32-kv32-d128-v32000-bfloat16"
GIB = 2**30


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("profile_models")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_plan_drops_the_batches_that_do_not_fit(script: ModuleType) -> None:
    args = script.parse_args(
        [
            "--model",
            LLAMA_7B,
            "--dry-run",
            "--batch",
            "1",
            "8",
            "32",
            "64",
            "--context",
            "512",
            "2048",
        ]
    )
    plan = script.plan_model(LLAMA_7B, args, 80 * GIB)
    assert plan.arch_key == ARCH_7B
    # 7B: 0.5 MiB of KV per token, 12.6 GiB of weights; 64 x 2048 tokens need 64 GiB
    assert (plan.batch, plan.dropped_batch) == ([1, 8, 32], [64])
    assert plan.pool_blocks == 32 * (2048 // 32) * 32 * 32  # seqs x logical x layers x heads
    assert plan.prefill_tokens == script.DEFAULT_PREFILL_TOKENS
    assert plan.measurements(2) == 2 * (6 + 3 * 2)
    assert script.plan_model(LLAMA_7B, args, 200 * GIB).dropped_batch == []


def test_dry_run_lists_the_grid_without_a_gpu() -> None:
    res = run(
        "--model",
        LLAMA_7B,
        "--dry-run",
        "--sm",
        "0.5",
        "1.0",
        "--batch",
        "1",
        "4",
        "--context",
        "128",
        "1024",
        "--gpu-memory-gib",
        "80",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "planning for 80 GiB, dtype bfloat16, block 16384 bytes, tp [1], SM shares [0.5, 1.0]",
        f"{ARCH_7B}  ({LLAMA_7B})",
        "  prefill tokens: [128, 256, 512, 1024, 2048, 4096]  (sequences of <= 512)",
        "  decode batch:   [1, 4]",
        "  decode context: [128, 1024]",
        # the prefill of 4096 tokens (8 x 512) needs as many blocks as decode 4 x 1024
        f"  pool: {8 * 16 * 32 * 32} blocks; 20 measurements",
        "20 measurements of 10 runs each",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tp", "2", "--dry-run"], "tensor parallelism is not implemented"),
        (["--sm", "0", "--dry-run"], "--sm: shares must be in (0, 1]"),
        (["--batch", "4", "2", "--dry-run"], "--batch: positive and strictly increasing"),
        ([], "--out is required (or --dry-run)"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    res = run("--model", LLAMA_7B, *args)
    assert res.returncode == 2 and message in res.stderr


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="the refusal is for machines without one")
def test_refuses_to_measure_without_a_gpu(tmp_path: Path) -> None:
    res = run("--model", LLAMA_7B, "--out", str(tmp_path / "p.json"))
    assert res.returncode == 2
    assert "needs a CUDA GPU" in res.stderr and "--dry-run" in res.stderr
    assert not (tmp_path / "p.json").exists()


@pytest.mark.gpu
def test_a_small_profile_loads_in_placement(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    res = run(
        "--model",
        LLAMA_7B,
        "--out",
        str(out),
        "--prefill-tokens",
        "128",
        "512",
        "--batch",
        "1",
        "4",
        "--context",
        "128",
        "512",
        "--repeat",
        "3",
        "--warmup",
        "1",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    table = load_profile(out)
    assert table.gpu == torch.cuda.get_device_name()
    t1 = table.decode(ARCH_7B, 1, 1.0, 1, 128, lambda s: 1.0)
    t4 = table.decode(ARCH_7B, 1, 1.0, 4, 512, lambda s: 1.0)
    assert t1 is not None and t4 is not None and 0 < t1 <= t4 * 1.5
    assert table.prefill(ARCH_7B, 1, 1.0, 512, lambda s: 1.0) is not None
