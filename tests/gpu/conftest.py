"""GPU suite: `pytest -m gpu tests/gpu -s` on a CUDA machine; skipped without one.

Each test prints its numbers; with `MUXSERVE_GPU_REPORT=file.jsonl` they are also appended to
that file, one JSON object per measurement, with the GPU's name. Engine configs here name their
device (`cuda`): tests/conftest.py makes `device: auto` mean cpu for the CPU suite.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from muxserve.cuda_timing import copy_bandwidth as measure_copy_bandwidth
from muxserve.models.hf_config import HFModelConfig, load_hf_config
from muxserve.models.llama import LlamaForCausalLM
from muxserve.runner.kernels import kernel_build, ops

REPO = Path(__file__).resolve().parents[2]
LLAMA_7B = REPO / "configs" / "models" / "llama-7b"  # the LLaMA-7B architecture (config only)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # NVML counts the GPUs; is_available() would initialise CUDA in the pytest process at
    # collection, before any test could start an MPS daemon in it
    if torch.cuda.device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="session")
def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


@pytest.fixture(scope="session")
def kernels(device: torch.device) -> Iterator[ModuleType]:
    """The kernels built for this GPU; MUXSERVE_KERNELS=on so nothing falls back silently."""
    old = os.environ.get(ops.KERNELS_ENV)
    os.environ[ops.KERNELS_ENV] = "on"
    major, minor = torch.cuda.get_device_capability(device)
    yield kernel_build.build_kernels(f"{major}{minor}")
    if old is None:
        os.environ.pop(ops.KERNELS_ENV, None)
    else:
        os.environ[ops.KERNELS_ENV] = old


Report = Callable[..., None]


@pytest.fixture(scope="session")
def report(gpu_name: str) -> Report:
    """report(name, **numbers): print them, and append them to $MUXSERVE_GPU_REPORT if set."""

    def record(name: str, **numbers: Any) -> None:
        row = {"test": name, "gpu": gpu_name, **numbers}
        print(f"\n[gpu-report] {json.dumps(row)}")
        path = os.environ.get("MUXSERVE_GPU_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return record


@pytest.fixture(scope="session")
def copy_bandwidth(device: torch.device, report: Report) -> float:
    """Device-to-device copy bandwidth, bytes/s: (read + written bytes) / time of a 1 GiB copy."""
    nbytes = 1 << 30
    bandwidth = measure_copy_bandwidth(device, nbytes)
    torch.cuda.empty_cache()  # the 2 GiB of copy buffers
    report("copy_bandwidth", bytes=nbytes, seconds=2 * nbytes / bandwidth, gb_per_s=bandwidth / 1e9)
    return bandwidth


def llama_7b_config() -> HFModelConfig:
    return load_hf_config(LLAMA_7B)


@torch.no_grad()
def random_model(
    config: HFModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> LlamaForCausalLM:
    """The architecture with random weights of real sizes (N(0, 0.02); norms at 1)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    model.requires_grad_(False)
    model.build_rope_cache(device)
    return model
