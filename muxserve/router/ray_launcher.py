"""The `ray` launcher: each mesh is a Ray actor in a placement group on the mesh's node.

Ray finds the nodes, gives each mesh's actor its GPUs (it sets `CUDA_VISIBLE_DEVICES`, so the
engine sees them as cuda:0..; the plan's GPU count and node are honoured, the indices are
Ray's to choose) and restarts an actor whose process dies (`max_restarts=-1`). The actor runs
the same mesh runtime as a local child process, and the router connects to it the same way.

Install with `pip install 'muxserve[ray]'`. On one host with no cluster, a local Ray instance is
started bound to loopback.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from muxserve.config import Mesh, MuxConfig
from muxserve.errors import ConfigError, MeshStartError
from muxserve.mesh.runtime import Endpoint, MeshLaunch
from muxserve.router.mesh_process import LaunchContext
from muxserve.router.preflight import NodeMemory, check_plan
from muxserve.router.ray_nodes import RayNode, alive_nodes, connect

log = logging.getLogger(__name__)

CPU_MESH_CPUS = 0.1  # a CPU mesh's claim on its node's CPUs: placement, not a thread budget
NODE_AFFINITY = 0.001  # of the node's `node:<ip>` resource: pins the bundle to that node


class MeshActor:
    """The body of the Ray actor that runs one mesh (made remote by `RayLauncher`)."""

    def __init__(self, launch_json: dict[str, Any]) -> None:
        import asyncio

        from muxserve.mesh.runtime import run_mesh

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        self.launch = MeshLaunch.from_json(launch_json)
        self._ready = threading.Event()
        self._endpoint: Endpoint | None = None
        self._error: str | None = None
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()

        def ready(ep: Endpoint) -> None:
            self._endpoint = ep
            self._ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(run_mesh(self.launch, ready, self._stop))
            except Exception as e:
                log.exception("mesh %s failed", self.launch.mesh)
                self._error = f"{type(e).__name__}: {e}"
            finally:
                self._ready.set()

        self._thread = threading.Thread(target=run, name=f"mesh-{self.launch.mesh}", daemon=True)
        self._thread.start()

    def endpoint(self, timeout: float) -> tuple[str, int, int]:
        """(host, port, pid) once serving; raises if loading failed or took over `timeout`."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"mesh {self.launch.mesh} was not serving after {timeout:.0f} s")
        if self._endpoint is None or self._error is not None:
            raise RuntimeError(self._error or "the mesh stopped before serving")
        ep = self._endpoint
        return ep.host, ep.port, ep.pid

    def stop(self, timeout: float) -> bool:
        """Stop serving (abort, free, stop the engine); True if it ended within `timeout`."""
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        return not self._thread.is_alive()


class RayLauncher:
    """Meshes as Ray actors; `address` names the cluster (None: RAY_ADDRESS, else local)."""

    def __init__(self, address: str | None = None) -> None:
        try:
            connect(address)  # now: a missing Ray or an unreachable cluster fails at once
        except ImportError as e:
            raise ConfigError("--launcher ray needs Ray: pip install 'muxserve[ray]'") from e
        self.address = address
        self._nodes: list[RayNode] | None = None

    def nodes(self, config: MuxConfig) -> list[RayNode]:
        if self._nodes is None:
            connect(self.address)
            self._nodes = alive_nodes(with_gpus=config.engine.device != "cpu")
        return self._nodes

    def check(self, config: MuxConfig) -> None:
        nodes = self.nodes(config)
        if not nodes:
            raise ConfigError(
                "the Ray cluster has no alive node with GPUs; set engine.device: cpu to serve "
                "the plan on CPUs"
            )
        # Ray knows each node's GPU count, not its GPUs' memory: that is checked by the mesh
        # itself when it sizes its pool
        check_plan(
            config,
            [NodeMemory(tuple(1 << 62 for _ in range(n.gpus)), n.memory_bytes) for n in nodes],
        )

    def process(self, ctx: LaunchContext, mesh: Mesh) -> RayMeshProcess:
        return RayMeshProcess(ctx, mesh, self.nodes(ctx.config)[mesh.node])


class RayMeshProcess:
    """One mesh's actor and placement group."""

    def __init__(self, ctx: LaunchContext, mesh: Mesh, node: RayNode) -> None:
        self.name = mesh.name
        self.mesh = mesh
        self.ray_node = node
        on_cpu = ctx.config.engine.device == "cpu"
        # the router connects to the node's address: listen there, not on loopback
        self.launch = MeshLaunch.of(ctx.config, mesh.name, ctx.token, host=node.address)
        self.gpus = 0 if on_cpu else len(mesh.gpus)
        self.actor: Any = None
        self.pg: Any = None
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def node(self) -> str | None:
        return self.ray_node.address

    def start(self, timeout: float) -> Endpoint:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle: dict[str, float] = {
            "CPU": CPU_MESH_CPUS,
            self.ray_node.affinity_resource: NODE_AFFINITY,
        }
        if self.gpus:
            bundle["GPU"] = self.gpus
        self.pg = placement_group([bundle], strategy="STRICT_PACK", name=f"muxserve-{self.name}")
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except Exception as e:
            self._remove_pg()
            raise MeshStartError(
                f"mesh {self.name!r}: Ray could not reserve {bundle} on node "
                f"{self.ray_node.address} within {timeout:.0f} s ({type(e).__name__})"
            ) from e
        actor_cls = ray.remote(MeshActor)
        self.actor = actor_cls.options(
            num_cpus=CPU_MESH_CPUS,
            num_gpus=self.gpus,
            max_restarts=-1,  # Ray brings a dead mesh back; the router reconnects
            max_concurrency=4,  # `stop` and `endpoint` while the mesh serves
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg),
            name=None,
        ).remote(self.launch.to_json())
        try:
            return self._endpoint(timeout)
        except BaseException:
            self.stop(0.0)
            raise

    def _endpoint(self, timeout: float) -> Endpoint:
        """The actor's endpoint, waiting through a restart Ray is still making."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MeshStartError(f"mesh {self.name!r} was not serving after {timeout:.0f} s")
            try:
                host, port, pid = ray.get(self.actor.endpoint.remote(left), timeout=left + 5)
            except RayActorError as e:  # dead or restarting: ask the restarted actor
                log.info(
                    "mesh %s: actor unavailable (%s); waiting for Ray", self.name, type(e).__name__
                )
                time.sleep(min(0.5, max(left, 0)))  # Ray gives no event for "restarted"
                continue
            except GetTimeoutError as e:
                raise MeshStartError(
                    f"mesh {self.name!r} was not serving after {timeout:.0f} s"
                ) from e
            except Exception as e:  # the mesh raised while loading
                raise MeshStartError(f"mesh {self.name!r} failed to start: {_cause(e)}") from e
            self._pid = int(pid)
            return Endpoint(str(host), int(port), int(pid))

    def exit_reason(self, timeout: float) -> str | None:
        return None  # Ray restarts the actor; its logs say why it died

    def restart(self, timeout: float) -> Endpoint:
        if self.actor is None:
            return self.start(timeout)
        return self._endpoint(timeout)  # Ray restarts the actor; wait for it to serve

    def kill(self) -> None:
        if self.actor is not None:
            import ray

            ray.kill(self.actor, no_restart=False)  # Ray starts it again

    def stop(self, timeout: float) -> None:
        import ray

        if self.actor is not None:
            try:
                if timeout > 0:
                    ray.get(self.actor.stop.remote(timeout), timeout=timeout + 5)
            except Exception as e:
                log.warning("mesh %s: did not stop cleanly (%s); killing it", self.name, e)
            ray.kill(self.actor, no_restart=True)
            self.actor = None
        self._remove_pg()
        self._pid = None

    def _remove_pg(self) -> None:
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None


def _cause(e: BaseException) -> str:
    """The mesh's own error out of Ray's wrapper (RayTaskError carries it as `cause`)."""
    cause = getattr(e, "cause", None)
    text = str(cause) if cause is not None else str(e)
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__
