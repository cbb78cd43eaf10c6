"""The process tree the benchmarks watch: children and grandchildren, with their commands."""

from __future__ import annotations

import os
import subprocess
import sys

from muxserve.bench.processes import descendants
from tests.helpers.wait import wait_until

CHILD = (
    "import subprocess, sys, time; "
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print(g.pid, flush=True); time.sleep(60)"
)


def test_descendants_are_children_and_grandchildren_with_their_commands() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        wait_until(lambda: grandchild in descendants(os.getpid()), 10.0, "grandchild seen")
        tree = descendants(os.getpid())
        assert {child.pid, grandchild} <= set(tree)
        assert "time.sleep(60)" in tree[grandchild]
        assert descendants(grandchild) == {}
    finally:
        subprocess.run(["pkill", "-P", str(child.pid)], check=False)
        child.kill()
        child.wait()
