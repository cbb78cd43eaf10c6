"""`python -m muxserve.mesh`: one mesh engine as a child process of `muxserve serve`.

Protocol with the parent, over the standard streams:
- stdin: one JSON line (the `MeshLaunch`), then nothing; its end means the parent is gone, and
  the mesh stops (so a killed router leaves no mesh behind);
- stdout: one JSON line, `{"host", "port", "pid"}` once serving or `{"error"}` if loading
  failed; logs go to stderr.
SIGTERM or SIGINT: abort what runs, stop the engine (and its workers), exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading

from muxserve.mesh.runtime import Endpoint, MeshLaunch, run_mesh


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("MUXSERVE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    line = sys.stdin.readline()
    if not line:
        return 1  # the parent went away before telling us anything
    launch = MeshLaunch.from_json(json.loads(line))
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but the ready line may reach the parent's pipe

    def report(data: dict[str, object]) -> None:
        out.write(json.dumps(data) + "\n")
        out.flush()

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def watch_parent() -> None:
        sys.stdin.read()  # returns at EOF: the parent closed our stdin or died
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()

    def ready(ep: Endpoint) -> None:
        report({"host": ep.host, "port": ep.port, "pid": ep.pid})

    try:
        loop.run_until_complete(run_mesh(launch, ready, stop))
    except Exception as e:
        logging.getLogger("muxserve.mesh").exception("mesh %s failed", launch.mesh)
        report({"error": f"{type(e).__name__}: {e}"})
        return 1
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
