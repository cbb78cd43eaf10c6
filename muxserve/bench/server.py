"""`muxserve serve` in a child process on a free loopback port, for benchmarks and tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`with ServerProcess(config) as url:` serves `config` until the block ends.

    The server's output goes to `log` (default: discarded). Leaving the block sends SIGTERM
    (a graceful drain) and waits for the exit.
    """

    def __init__(
        self,
        config: str | Path,
        *,
        log: IO[str] | None = None,
        startup_timeout: float = 120.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.config = Path(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> str:
        cmd = [sys.executable, "-m", "muxserve.cli", "serve", "--config", str(self.config)]
        cmd += ["--port", str(self.port), "--log-level", "WARNING", *self.extra_args]
        out = self.log if self.log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, text=True)
        deadline = time.monotonic() + self.startup_timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} at startup")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not come up in {self.startup_timeout:g}s")
            time.sleep(0.2)
        return self.url

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait; SIGKILL if it does not exit in `timeout`. The exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
