"""The watchdog's signs of a hung worker: a deadline by job size, and no progress."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from muxserve.executor.watchdog import JobDeadline, ProcSample, ProgressProbe, read_proc
from tests.helpers.wait import wait_until


class FakeProc:
    """What /proc says of pid 7, as the test sets it."""

    def __init__(self) -> None:
        self.sample: ProcSample | None = ProcSample(False, 100)

    def __call__(self, pid: int) -> ProcSample | None:
        assert pid == 7
        return self.sample


def test_cpu_time_is_progress_and_a_stop_is_not() -> None:
    proc = FakeProc()
    probe = ProgressProbe(proc)
    assert probe.stalled_for(7, "job-1", 10.0, cpu_counts=True) == 0.0  # first look
    assert probe.stalled_for(7, "job-1", 12.0, cpu_counts=True) == 2.0  # no CPU used
    proc.sample = ProcSample(False, 103)
    assert probe.stalled_for(7, "job-1", 13.0, cpu_counts=True) == 0.0  # slow, but working
    proc.sample = ProcSample(True, 103)
    assert probe.stalled_for(7, "job-1", 15.5, cpu_counts=True) == 2.5  # stopped since 13
    assert probe.stalled_for(7, "job-2", 40.0, cpu_counts=True) == 0.0  # a new job: afresh
    proc.sample = None  # gone
    assert probe.stalled_for(7, "job-2", 41.0, cpu_counts=True) == 0.0


def test_on_a_gpu_only_the_stopped_state_counts() -> None:
    proc = FakeProc()
    probe = ProgressProbe(proc)
    probe.stalled_for(7, "j", 0.0, cpu_counts=False)
    assert probe.stalled_for(7, "j", 30.0, cpu_counts=False) == 0.0  # waits on the device
    proc.sample = ProcSample(True, 100)
    assert probe.stalled_for(7, "j", 31.0, cpu_counts=False) == 1.0  # stopped: since 30
    assert probe.stalled_for(7, "j", 35.0, cpu_counts=False) == 5.0


def test_read_proc_tells_a_stopped_process_and_its_cpu_time() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = read_proc(os.getpid())
        assert mine is not None and not mine.stopped and mine.cpu_ticks > 0
        os.kill(child.pid, signal.SIGSTOP)
        wait_until(lambda: (s := read_proc(child.pid)) is not None and s.stopped, 10.0, "stopped")
        os.kill(child.pid, signal.SIGCONT)
        wait_until(lambda: not read_proc(child.pid).stopped, 10.0, "running")  # type: ignore[union-attr]
    finally:
        child.kill()
        child.wait()
    assert read_proc(child.pid) is None  # reaped: gone


def test_the_deadline_grows_with_the_job_and_doubles_its_floor_for_a_first_job() -> None:
    class J:
        num_tokens = 300

    d = JobDeadline(10.0, 0.02)
    assert d.of(J()) == 16.0  # type: ignore[arg-type]
    assert d.of(J(), first=True) == 26.0  # type: ignore[arg-type]
    assert d.stall_s == 10.0
