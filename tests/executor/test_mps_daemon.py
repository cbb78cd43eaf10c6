"""The MPS control daemon's commands and environments, against a stand-in executable (no GPU)."""

from __future__ import annotations

import stat
import tempfile
from pathlib import Path

import pytest
import torch

from muxserve.executor.mps import MpsExecutor
from muxserve.executor.mps_daemon import MpsDaemon, MpsUnavailableError, thread_percentage
from muxserve.executor.worker_plans import worker_env
from muxserve.runner.kv_pool import PoolSizing

# Stands in for nvidia-cuda-mps-control: `-d` makes the control pipe, like the real daemon,
# and every call appends its arguments, pipe directory and stdin to $FAKE_MPS_LOG.
FAKE = """#!/bin/sh
input=""
if [ "$#" -eq 0 ]; then input=$(cat); fi
echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY stdin=$input" \\
    >> "$FAKE_MPS_LOG"
if [ "$1" = "-d" ]; then touch "$CUDA_MPS_PIPE_DIRECTORY/control"; fi
"""
BROKEN = """#!/bin/sh
echo "An instance of this daemon is already running" >&2
exit 1
"""


def script(folder: Path, body: str) -> str:
    path = folder / "nvidia-cuda-mps-control"
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("share,pct", [(1.0, 100), (0.5, 50), (0.333, 33), (0.001, 1)])
def test_thread_percentage(share, pct):
    assert thread_percentage(share) == pct


def test_start_and_stop_use_our_own_directories(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    daemon = MpsDaemon.start(script(tmp_path, FAKE))
    assert daemon.root.name.startswith("muxserve-mps-") and daemon.root.is_dir()
    assert daemon.start_command()[1:] == ["-d"]
    assert daemon.client_env(0.3) == {
        "CUDA_MPS_PIPE_DIRECTORY": str(daemon.pipe_dir),
        "CUDA_MPS_LOG_DIRECTORY": str(daemon.log_dir),
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30",
    }
    daemon.stop()
    assert log.read_text().splitlines() == [
        f"args=-d pipe={daemon.pipe_dir} log={daemon.log_dir} stdin=",
        f"args= pipe={daemon.pipe_dir} log={daemon.log_dir} stdin=quit",
    ]
    assert not daemon.root.exists()


def test_missing_binary_says_how_to_serve_without_mps(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MpsUnavailableError, match=r"not on PATH.*executor: inline"):
        MpsDaemon.start()


def test_daemon_that_fails_says_why(tmp_path):
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("muxserve-mps-*"))
    with pytest.raises(MpsUnavailableError, match=r"already running.*executor: inline"):
        MpsDaemon.start(script(tmp_path, BROKEN))
    assert set(temp.glob("muxserve-mps-*")) == before  # its directories are gone


def test_mps_executor_on_cuda_fails_before_touching_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MpsUnavailableError, match="executor: inline"):
        MpsExecutor.create([], PoolSizing(4096, 8 * 4096), torch.device("cuda"))


def test_worker_environment(tmp_path):
    daemon = MpsDaemon("nvidia-cuda-mps-control", tmp_path)
    assert worker_env(daemon, 0.25, 1) == daemon.client_env(0.25)
    assert worker_env(daemon, 0.25, 1)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert worker_env(None, 0.5, 3) == {"OMP_NUM_THREADS": "3"}
