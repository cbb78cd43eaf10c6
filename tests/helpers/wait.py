"""Waiting for an event in a test: every wait has a deadline, and a failed one says what."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

POLL_S = 0.005  # between looks at a condition that has no event to wait on


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> None:
    """Return once `cond()` is true; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(POLL_S)


async def until(cond: Callable[[], object], timeout: float, what: str) -> None:
    """`wait_until` inside an event loop: the loop keeps running between looks."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        await asyncio.sleep(POLL_S)
