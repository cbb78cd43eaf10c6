"""A process tree from /proc: what a benchmark watches of the servers it starts."""

from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live descendant of `pid` (from /proc; {} without it)."""
    parents: dict[int, int] = {}
    cmds: dict[int, str] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                ln.split(":\t", 1) for ln in status.read_text().splitlines() if ":\t" in ln
            )
            p = int(status.parent.name)
            parents[p] = int(fields["PPid"].strip())
            cmds[p] = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, KeyError):
            continue
    out, frontier = {}, [pid]
    while frontier:
        cur = frontier.pop()
        for child, parent in parents.items():
            if parent == cur and child not in out:
                out[child] = cmds.get(child, "")
                frontier.append(child)
    return out
