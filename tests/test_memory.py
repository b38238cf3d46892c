"""Freed memory given back to the system (seaking/memory.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from seaking.memory import AllocatorTrim, glibc_malloc_trim

GLIBC = glibc_malloc_trim() is not None

# Freed between live objects, in blocks too big for Python's own small-object allocator: glibc keeps those pages.
FRAGMENTED_HEAP = """
import gc
from seaking.memory import glibc_malloc_trim

def rss_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) // 1024

blocks = [bytes(2000) + str(i).encode() for i in range(60000)]
survivors = blocks[::50]
del blocks
gc.collect()
before = rss_mib()
glibc_malloc_trim()(0)
print(before, rss_mib())
"""


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_a_trim_gives_freed_memory_back():
    output = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, timeout=60, check=True)
    before, after = map(int, output.stdout.split())
    assert before > 100 and after < before / 2, (before, after)


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
async def test_the_addon_trims_from_running_to_done():
    trim = AllocatorTrim(interval=0.01)
    trim.running()
    async with asyncio.timeout(5):
        while trim.trims < 2:
            await asyncio.sleep(0.01)
    trim.done()
    await asyncio.sleep(0.05)
    stopped_at = trim.trims
    await asyncio.sleep(0.05)
    assert trim.trims == stopped_at
