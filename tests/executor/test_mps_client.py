"""The engine process as an MPS client: refused once CUDA is initialised, detected without
initialising it (no GPU: a stand-in driver library and MPS control executable)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from muxserve.engine import AUTO_DEVICE_ENV, resolve_device
from muxserve.executor import mps
from muxserve.executor.mps import MpsExecutor
from muxserve.executor.mps_daemon import (
    CUDA_ERROR_NOT_INITIALIZED,
    MpsUnavailableError,
    cuda_initialized,
)
from muxserve.runner.kv_pool import PoolSizing
from tests.executor.test_mps_daemon import FAKE, script


class FakeLibcuda:
    """`cuDeviceGetCount` as the driver answers it before and after `cuInit`."""

    def __init__(self, initialised: bool) -> None:
        self.initialised = initialised
        self.calls = 0

    def cuDeviceGetCount(self, count: object) -> int:
        self.calls += 1
        if not self.initialised:
            return CUDA_ERROR_NOT_INITIALIZED
        ctypes.cast(count, ctypes.POINTER(ctypes.c_int))[0] = 1
        return 0


def test_cuda_initialised_asks_the_driver(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    before, after = FakeLibcuda(False), FakeLibcuda(True)
    assert (cuda_initialized(before), cuda_initialized(after)) == (False, True)
    assert (before.calls, after.calls) == (1, 1)


def test_torch_initialised_needs_no_driver_call(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    lib = FakeLibcuda(False)
    assert cuda_initialized(lib) is True
    assert lib.calls == 0


def test_no_driver_means_nothing_initialised():
    # this machine has no libcuda.so.1 (a CPU host): the probe says so without raising
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        assert cuda_initialized() is False
    else:
        pytest.skip("a CUDA driver is installed here")


def test_mps_refused_once_cuda_is_initialised(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    monkeypatch.setenv("PATH", f"{tmp_path}")
    script(tmp_path, FAKE)
    monkeypatch.setattr(mps, "cuda_initialized", lambda: True)
    with pytest.raises(
        MpsUnavailableError,
        match=r"^CUDA is initialised in this process already, .* torch\.cuda\.device_count, "
        r"not is_available\), or set engine\.executor: inline",
    ):
        MpsExecutor.create([], PoolSizing(4096, 8 * 4096), torch.device("cuda"))
    assert not log.exists()  # no daemon was started


@pytest.mark.parametrize(
    ("env", "gpus", "device"),
    [("cpu", 4, "cpu"), ("", 2, "cuda"), ("", 0, "cpu"), ("cuda:1", 2, "cuda:1")],
)
def test_auto_device(monkeypatch, env, gpus, device):
    monkeypatch.setenv(AUTO_DEVICE_ENV, env)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("initialises CUDA"))
    assert resolve_device("auto") == torch.device(device)
    assert resolve_device("cpu") == torch.device("cpu")


def test_the_cpu_tests_are_pinned_to_cpu():
    """tests/conftest.py: `device: auto` is the CPU in this suite, even on a GPU machine."""
    assert resolve_device("auto") == torch.device("cpu")
