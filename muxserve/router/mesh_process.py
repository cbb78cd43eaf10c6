"""How a mesh's engine process is run: the `MeshProcess` protocol and the launcher registry.

`local` runs each mesh as a child process of this one; `ray` runs it as a Ray actor in a
placement group on the mesh's node. The router drives both the same way (`MeshSupervisor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from muxserve.config import Mesh, MuxConfig
from muxserve.mesh.runtime import Endpoint

START_TIMEOUT_S = 600.0  # loading a mesh's models (a 70B checkpoint from disk takes minutes)
STOP_TIMEOUT_S = 15.0  # a mesh not gone this long after it was asked to stop is killed


class MeshProcess(Protocol):
    """One mesh's engine process. Methods block: the router calls them from a thread."""

    name: str

    @property
    def pid(self) -> int | None:
        """The engine process's id, while one runs."""
        ...

    @property
    def node(self) -> str | None:
        """The host (or Ray node) it runs on."""
        ...

    def start(self, timeout: float) -> Endpoint:
        """Launch and wait until the engine serves; MeshStartError (naming the mesh) if it
        cannot, and nothing is left running."""
        ...

    def exit_reason(self, timeout: float) -> str | None:
        """How the engine's process ended ("exit code 1", "signal SIGKILL"), waiting up to
        `timeout` s for it to end; None if it still runs or that is not known."""
        ...

    def restart(self, timeout: float) -> Endpoint:
        """After the engine died (or was killed), make sure it is gone and bring it back."""
        ...

    def kill(self) -> None:
        """End it now (a hung engine); the router then restarts it."""
        ...

    def stop(self, timeout: float) -> None:
        """Ask it to stop (abort, free, exit), kill it after `timeout`; idempotent."""
        ...


@dataclass(frozen=True)
class LaunchContext:
    """What every launcher is given for every mesh."""

    config: MuxConfig  # the whole plan
    token: str  # the secret meshes require of the router


class Launcher(Protocol):
    """Runs the meshes of a plan somewhere."""

    def check(self, config: MuxConfig) -> None:
        """ConfigError naming the mesh if the plan cannot run where this launcher runs it
        (GPUs or nodes that do not exist, a mesh over its memory); starts nothing."""
        ...

    def process(self, ctx: LaunchContext, mesh: Mesh) -> MeshProcess:
        """The (not yet started) process of `mesh`."""
        ...


def get_launcher(name: str, ray_address: str | None = None) -> Launcher:
    """The launcher called `name`: "local" or "ray"."""
    if name == "local":
        from muxserve.router.local import LocalLauncher

        return LocalLauncher()
    if name == "ray":
        from muxserve.router.ray_launcher import RayLauncher

        return RayLauncher(ray_address)
    raise ValueError(f"unknown launcher {name!r}; use 'local' or 'ray'")
