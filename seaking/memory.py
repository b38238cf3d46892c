"""Freed memory given back to the system.

CPython frees an object's memory into the C allocator, and glibc's malloc keeps what was freed for reuse: after a
burst of streams the process stays as big as at its peak, and with fragmentation it creeps upwards (the 5-minute chaos
soak, docs/soak.md: resident memory 1.11 times its first minute's, without a leak in Python's own objects). glibc's
malloc_trim hands the free pages back; called once a minute it keeps the resident memory flat. Other C libraries
(musl, macOS, Windows) have no malloc_trim, and nothing is done there.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable

TRIM_INTERVAL = 60.0  # seconds; a trim takes well under a millisecond, ~12 ms for a badly fragmented 130 MiB heap


def glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim(pad), or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the symbols the running process has loaded
    except (OSError, AttributeError, TypeError):  # pragma: no cover - musl, macOS; TypeError: Windows has no CDLL(None)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class AllocatorTrim:
    """mitmproxy addon: from running to done, glibc's free memory returned to the system every TRIM_INTERVAL."""

    name = "seaking.allocator_trim"

    def __init__(self, interval: float = TRIM_INTERVAL) -> None:
        self.interval = interval
        self.trims = 0
        self._trim = glibc_malloc_trim()
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        if self._trim is not None:
            self._task = asyncio.get_running_loop().create_task(self._trim_forever())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _trim_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._trim(0)
            self.trims += 1
