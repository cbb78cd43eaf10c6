"""The kernel build's toolchain check: nvcc vs the driver vs torch, from fakes (no GPU, no nvcc).

A build whose static runtime is newer than the driver links fine and fails every launch with
CUDA error 35; these checks refuse it before anything is compiled.
"""

from __future__ import annotations

import ctypes

import pytest

from muxserve.runner.kernels import kernel_build
from muxserve.runner.kernels.kernel_build import (
    KernelBuildError,
    Toolchain,
    check_toolchain,
    driver_cuda_version,
    parse_cuda_version,
    parse_nvcc_release,
)

NVCC_12_4 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2024 NVIDIA Corporation
Built on Thu_Mar_28_02:18:24_PDT_2024
Cuda compilation tools, release 12.4, V12.4.131
Build cuda_12.4.r12.4/compiler.34097967_0
"""


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (NVCC_12_4, (12, 4)),
        ("Cuda compilation tools, release 13.0, V13.0.48", (13, 0)),
        ("g++ (Debian 12.2.0-14) 12.2.0", None),
    ],
)
def test_parse_nvcc_release(text, version):
    assert parse_nvcc_release(text) == version


@pytest.mark.parametrize(
    ("text", "version"),
    [("12.4", (12, 4)), ("11.8", (11, 8)), ("13.0.1", (13, 0)), (None, None), ("", None)],
)
def test_parse_cuda_version(text, version):
    assert parse_cuda_version(text) == version


class FakeLibcuda:
    """`cuDriverGetVersion` answering `version` (or the error code `error`)."""

    def __init__(self, version: int, error: int = 0) -> None:
        self.version, self.error = version, error

    def cuDriverGetVersion(self, out: object) -> int:
        ctypes.cast(out, ctypes.POINTER(ctypes.c_int))[0] = self.version
        return self.error


@pytest.mark.parametrize(
    ("version", "error", "want"),
    [(12040, 0, (12, 4)), (13000, 0, (13, 0)), (12080, 0, (12, 8)), (12040, 3, None), (0, 0, None)],
)
def test_driver_cuda_version(version, error, want):
    assert driver_cuda_version(FakeLibcuda(version, error)) == want


OK = None


@pytest.mark.parametrize(
    ("nvcc", "driver", "torch", "error"),
    [
        ((12, 4), (12, 4), (12, 4), OK),
        ((12, 8), (12, 4), (12, 4), OK),  # minor version compatibility: SASS runs
        ((12, 4), (13, 0), (12, 6), OK),  # an older runtime on a newer driver: always fine
        ((12, 4), None, None, OK),  # unknown versions: the launch probe decides
        (None, (12, 0), (13, 0), OK),
        (
            (13, 0),
            (12, 4),
            (13, 0),
            "nvcc 13.0 builds for CUDA 13, but the driver runs CUDA up to 12.4: every kernel "
            "launch would fail (CUDA error 35); put an nvcc 12.x first on PATH or update the "
            "driver",
        ),
        (
            (13, 0),
            (13, 0),
            (12, 8),
            "nvcc 13.0 and torch's CUDA 12.8 differ in major version: put an nvcc 12.x first on "
            "PATH (torch.version.cuda)",
        ),
    ],
)
def test_check_toolchain(nvcc, driver, torch, error):
    tc = Toolchain(nvcc, driver, torch)
    if error is None:
        check_toolchain(tc)
        return
    with pytest.raises(KernelBuildError) as e:
        check_toolchain(tc)
    assert str(e.value) == error


def test_an_nvcc_the_driver_cannot_run_is_refused_before_building(monkeypatch):
    monkeypatch.setattr(kernel_build.shutil, "which", lambda name: f"/usr/local/cuda/bin/{name}")
    monkeypatch.setattr(kernel_build, "toolchain", lambda: Toolchain((13, 0), (12, 2), (13, 0)))
    monkeypatch.setattr(kernel_build, "build", lambda plan: pytest.fail("built anyway"))
    with pytest.raises(KernelBuildError, match=r"^nvcc 13\.0 builds for CUDA 13, but the driver"):
        kernel_build.build_kernels.__wrapped__("90")  # uncached: other tests may have built


def test_the_emulated_build_needs_no_cuda_toolchain(monkeypatch):
    monkeypatch.setattr(kernel_build.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(kernel_build, "toolchain", lambda: pytest.fail("no CUDA toolchain"))
    monkeypatch.setattr(kernel_build, "build_plan", lambda arch: arch)
    monkeypatch.setattr(kernel_build, "build", lambda plan: f"built {plan}")
    assert kernel_build.build_kernels.__wrapped__(kernel_build.EMULATED) == "built emulated"
