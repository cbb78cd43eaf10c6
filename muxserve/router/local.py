"""The `local` launcher: each mesh is a child process of `muxserve serve` on this host.

The child is `python -m muxserve.mesh` in a session of its own (a Ctrl-C reaches the router,
which stops the meshes in order), with `CUDA_VISIBLE_DEVICES` set to the mesh's GPUs. Its
stdin stays open: when the router dies, the child sees EOF and stops, so no mesh outlives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from muxserve.config import Mesh, MuxConfig
from muxserve.errors import MeshStartError, exit_cause
from muxserve.mesh.runtime import Endpoint, MeshLaunch
from muxserve.router.mesh_process import LaunchContext
from muxserve.router.preflight import check_plan, local_node

log = logging.getLogger(__name__)


class LocalLauncher:
    """Meshes as child processes of this one; the plan must fit this host."""

    def check(self, config: MuxConfig) -> None:
        check_plan(config, [local_node()])

    def process(self, ctx: LaunchContext, mesh: Mesh) -> LocalMeshProcess:
        return LocalMeshProcess(ctx, mesh)


class LocalMeshProcess:
    """A mesh engine in a child process of this one."""

    def __init__(self, ctx: LaunchContext, mesh: Mesh) -> None:
        self.name = mesh.name
        self.launch = MeshLaunch.of(ctx.config, mesh.name, ctx.token)
        self.env = dict(os.environ)
        if ctx.config.engine.device != "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in mesh.gpus)
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def node(self) -> str | None:
        return socket.gethostname()

    def start(self, timeout: float) -> Endpoint:
        proc = subprocess.Popen(
            [sys.executable, "-m", "muxserve.mesh"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
            text=True,
            start_new_session=True,
        )
        self.proc = proc
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(self.launch.to_json()) + "\n")
            proc.stdin.flush()
            reply = self._ready_line(proc, timeout)
        except BaseException:
            self._end(proc, 0.0)
            raise
        if "error" in reply:
            self._end(proc, 0.0)
            raise MeshStartError(f"mesh {self.name!r} failed to start: {reply['error']}")
        return Endpoint(str(reply["host"]), int(reply["port"]), int(reply["pid"]))

    def _ready_line(self, proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        """The child's one JSON line, waiting at most `timeout` s (or until it exits)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MeshStartError(
                        f"mesh {self.name!r} was not serving after {timeout:.0f} s"
                    )
                if sel.select(min(left, 1.0)):
                    line = proc.stdout.readline()
                    if not line:
                        code = proc.wait()
                        raise MeshStartError(
                            f"mesh {self.name!r} exited with {exit_cause(code)} while starting; "
                            "see its log above"
                        )
                    reply: dict[str, Any] = json.loads(line)
                    return reply

    def exit_reason(self, timeout: float) -> str | None:
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return f"its process ended with {exit_cause(code)}"

    def restart(self, timeout: float) -> Endpoint:
        if self.proc is not None:
            self._end(self.proc, 5.0)
        return self.start(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def stop(self, timeout: float) -> None:
        if self.proc is not None:
            self._end(self.proc, timeout)

    def _end(self, proc: subprocess.Popen[str], timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout`; reaps the child and closes its pipes."""
        if proc.poll() is None and timeout > 0:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "mesh %s: not gone %.0f s after SIGTERM; killing it", self.name, timeout
                )
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
