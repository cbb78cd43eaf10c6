"""`muxserve serve`: every model of a config (or plan) behind one OpenAI-compatible endpoint.

With no arguments it serves the demo models (created on first start) on 127.0.0.1:8000 from
one engine in this process. A plan (a config with `meshes:`) is served as planned: one engine
per mesh in its own process (`--launcher local`, or Ray actors with `--launcher ray`), and this
process routes to them. SIGINT or SIGTERM: stop accepting connections, give in-flight requests
`--grace` seconds, abort the rest, stop the engines, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from muxserve.client.protocol import EngineClient
    from muxserve.config import MuxConfig

log = logging.getLogger("muxserve.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="serving config or plan (YAML); default: the demo models, created on first start",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("MUXSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MUXSERVE_API_KEY)",
    )
    p.add_argument("--max-body-mb", type=float, default=4.0, help="larger request bodies get 413")
    p.add_argument(
        "--header-timeout",
        type=float,
        default=30.0,
        help="seconds a connection may take to send a request's headers (counted from its "
        "opening or its last answer; an idle keep-alive connection is closed after it too)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        help="seconds a request may take to send its body once its headers are in (408)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM before being aborted",
    )
    p.add_argument(
        "--launcher",
        choices=["local", "ray"],
        default="local",
        help="how a plan's meshes run: child processes of this one on this host (local), or "
        "Ray actors on the plan's nodes (ray; pip install 'muxserve[ray]')",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster to join (default: RAY_ADDRESS, else a local Ray instance)",
    )
    p.add_argument(
        "--ignore-unknown-fields",
        action="store_true",
        help="log and drop request fields the API does not define, as vLLM does (default: a 400 "
        "naming the field, as OpenAI does)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Until the server's own handlers are in place, SIGTERM just ends the process quietly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    if args.api_key is not None and not args.api_key.strip():
        # an unset $KEY in `--api-key "$KEY"` must not serve without auth by surprise
        log.error(
            "the API key is empty (--api-key or $MUXSERVE_API_KEY): give a key, or leave "
            "both out to serve without one"
        )
        return 2
    try:  # the port first: a busy one fails at once, not after loading every model
        sock = bind(args.host, args.port)
    except OSError as e:
        log.error("cannot serve on %s:%d: %s", args.host, args.port, e)
        return 1

    from aiohttp import web

    from muxserve.config import load_config
    from muxserve.demo import default_config
    from muxserve.server.app import create_app
    from muxserve.server.connection import serve_forever
    from muxserve.server.context import ServerSettings

    config = load_config(args.config) if args.config else default_config(progress=True)
    client = make_client(config, args.launcher, args.ray_address)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning(
            "listening on %s without --api-key: anyone who can reach it may use it", args.host
        )
    settings = ServerSettings(
        api_key=args.api_key,
        max_body_bytes=int(args.max_body_mb * 2**20),
        shutdown_grace=args.grace,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        ignore_unknown_fields=args.ignore_unknown_fields,
    )
    app = create_app(client, settings)

    async def announce(_: web.Application) -> None:  # after the client (every mesh) started
        log.info("serving %s on http://%s:%d/v1", ", ".join(client.models), args.host, args.port)

    app.on_startup.append(announce)
    extra: dict[str, Any] = {} if args.access_log else {"access_log": None}
    # shutdown_timeout is a backstop: the app aborts what is left at `grace`
    serve_forever(app, sock, shutdown_timeout=args.grace + 5.0, **extra)
    log.info("stopped")
    return 0


def make_client(config: MuxConfig, launcher: str, ray_address: str | None) -> EngineClient:
    """A router over the plan's meshes, or one engine in this process for a plain config."""
    if not config.meshes:
        from muxserve.client.in_process import InProcessClient
        from muxserve.engine import MuxEngine

        return InProcessClient(MuxEngine.from_config(config, progress=True))
    from muxserve.router.mesh_process import get_launcher
    from muxserve.router.router import Router

    log.info(
        "serving a plan: %d models on %d meshes (%s), launcher %s",
        len(config.models),
        len(config.meshes),
        "; ".join(f"{m.name}: {', '.join(x.name for x in m.models)}" for m in config.meshes),
        launcher,
    )
    planner = None
    if config.router.replan is not None:  # re-planning while serving: placement's planner
        from placement.replanning import PlacementPlanner

        planner = PlacementPlanner(config, config.router.replan)
    return Router(config, get_launcher(launcher, ray_address), planner=planner)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on (host, port); OSError if the address is taken or invalid."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind right after a restart
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock
