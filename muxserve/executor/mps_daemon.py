"""The engine's own CUDA MPS control daemon: started with the mps executor, stopped with it.

MPS lets the worker processes of several models run kernels on one GPU at once, each limited
to `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` of its SMs. The daemon gets pipe and log directories of
its own (a temp dir), so it neither joins nor disturbs a system-wide MPS setup, and every
process that should be its client gets `client_env()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from muxserve.errors import MuxServeError

CONTROL = "nvidia-cuda-mps-control"
START_TIMEOUT_S = 10.0
HINT = "set engine.executor: inline to serve without MPS (one process, CUDA streams)"


class MpsUnavailableError(MuxServeError, RuntimeError):
    """MPS cannot run here; the message says why and how to serve without it."""


def thread_percentage(share: float) -> int:
    """`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` for an SM share: 1..100."""
    return max(1, min(100, round(share * 100)))


@dataclass
class MpsDaemon:
    """A running control daemon and the directories it talks and logs through."""

    executable: str
    root: Path  # temp dir holding pipe/ and log/; removed at stop

    @property
    def pipe_dir(self) -> Path:
        return self.root / "pipe"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def daemon_env(self) -> dict[str, str]:
        """The variables the daemon and all its clients must agree on."""
        return {
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }

    def client_env(self, share: float) -> dict[str, str]:
        """Environment of a worker process limited to `share` of the GPU's SMs."""
        percentage = str(thread_percentage(share))
        return self.daemon_env() | {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": percentage}

    def start_command(self) -> list[str]:
        return [self.executable, "-d"]

    @classmethod
    def start(cls, executable: str | None = None) -> MpsDaemon:
        """Start a daemon in a fresh temp dir; `MpsUnavailableError` if it cannot run."""
        exe = executable or shutil.which(CONTROL)
        if exe is None:
            raise MpsUnavailableError(f"{CONTROL} is not on PATH (no NVIDIA driver tools?); {HINT}")
        daemon = cls(exe, Path(tempfile.mkdtemp(prefix="muxserve-mps-")))
        daemon.pipe_dir.mkdir()
        daemon.log_dir.mkdir()
        env = _environ() | daemon.daemon_env()
        try:
            done = subprocess.run(
                daemon.start_command(), env=env, capture_output=True, timeout=START_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            daemon._remove()
            raise MpsUnavailableError(f"{exe} -d failed to run: {e}; {HINT}") from e
        if done.returncode != 0 or not daemon._wait_for_pipe():
            why = (done.stderr or done.stdout or b"").decode(errors="replace").strip()
            log = daemon._log_tail()
            daemon._remove()
            raise MpsUnavailableError(
                f"{exe} -d did not start (exit code {done.returncode}"
                f"{': ' + why if why else ''}{'; control.log: ' + log if log else ''}); "
                f"MPS needs a Volta or newer GPU and a compute mode that allows it; {HINT}"
            )
        return daemon

    def stop(self) -> None:
        """`quit` the daemon (it ends its server once the last client is gone), remove the dirs."""
        env = _environ() | self.daemon_env()
        # on failure there is nothing more to do; the temp dir goes anyway
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [self.executable], input=b"quit\n", env=env, capture_output=True, timeout=10
            )
        self._remove()

    def _wait_for_pipe(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if (self.pipe_dir / "control").exists():
                return True
            time.sleep(0.05)
        return False

    def _log_tail(self) -> str:
        log = self.log_dir / "control.log"
        return log.read_text(errors="replace").strip()[-300:] if log.exists() else ""

    def _remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _environ() -> dict[str, str]:
    return dict(os.environ)


def become_client(daemon: MpsDaemon) -> None:
    """Make this process an MPS client too: it allocates the pool and weights that workers map.

    CUDA reads the variables once, at its first initialisation in this process, which
    `MpsExecutor.create` has checked is still to come.
    """
    os.environ.update(daemon.daemon_env())


CUDA_ERROR_NOT_INITIALIZED = 3


def cuda_initialized(libcuda: Any = None) -> bool:
    """Whether CUDA has been initialised in this process, by torch or by anything else.

    `torch.cuda.is_initialized()` knows only torch's own lazy init, while
    `torch.cuda.is_available()` initialises the driver without it. A driver call that needs
    `cuInit` tells: before it, `cuDeviceGetCount` answers CUDA_ERROR_NOT_INITIALIZED and
    initialises nothing. `libcuda`: the driver library (tests pass a stand-in).
    """
    if torch.cuda.is_initialized():
        return True
    if libcuda is None:
        try:
            libcuda = ctypes.CDLL("libcuda.so.1")
        except OSError:  # no driver here: nothing can have been initialised
            return False
    count = ctypes.c_int(0)
    return int(libcuda.cuDeviceGetCount(ctypes.byref(count))) != CUDA_ERROR_NOT_INITIALIZED
