"""A self-pipe that makes a thread waiting in `multiprocessing.connection.wait` return."""

from __future__ import annotations

import contextlib
import os


class Waker:
    """`wake()` from any thread; the waiter watches `fileno()` and calls `clear()` after."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        if self._closed:
            return
        # a full pipe means a wake is pending anyway
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write, b"\0")

    def clear(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)
