"""Tools some tests need but the project does not (SillyTavern from npm, the openai SDK from PyPI), installed once.

Each is built in a staging directory beside its cache and renamed into place, so an interrupted install never looks
like a finished one. When the registry cannot be reached the tests that need the tool skip (RegistryUnavailable),
and the verdict is remembered for the rest of the run: npm's and pip's own retries make every offline try slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

# npm's and pip's words when they cannot reach their registry; any other failure is a real failure.
NETWORK_ERRORS = (
    # npm
    "ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH", "EHOSTUNREACH",
    "ERR_SOCKET_TIMEOUT", "network request", "socket hang up", "self signed certificate", "E502", "E503", "E504",
    # pip
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "ConnectTimeoutError", "ReadTimeoutError", "Read timed out", "ProxyError",
    "SSLError", "Network is unreachable", "No route to host", "Connection refused", "Connection reset",
    "RemoteDisconnected", "Could not fetch URL",
)


class RegistryUnavailable(Exception):
    """A package registry could not be reached (no network, registry down): tests should skip, not fail."""


_unavailable: dict[Path, RegistryUnavailable] = {}


async def run(argv: list[str], timeout: float, *, cwd: Path | None = None, env: dict | None = None) -> tuple[int, str]:
    """Exit code and combined output of `argv`; its whole process group is killed if it outlives `timeout` or the
    caller is cancelled, so that no npm or pip is left running."""
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        await kill_group(process, grace=0)
    return process.returncode, output.decode(errors="replace")


async def kill_group(process: asyncio.subprocess.Process, grace: float = 5) -> None:
    """SIGTERM the process's group (the process and anything it spawned), SIGKILL it if it outlives `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), grace)


def check(what: str, returncode: int, output: str) -> None:
    """Raise for a failed install step: RegistryUnavailable if the registry was out of reach, else RuntimeError."""
    if returncode == 0:
        return
    tail = "\n".join(output.splitlines()[-30:])
    if any(marker in output for marker in NETWORK_ERRORS):
        raise RegistryUnavailable(f"{what}: the package registry could not be reached:\n{tail}")
    raise RuntimeError(f"{what} failed (exit {returncode}):\n{tail}")


async def install_once(
    root: Path,
    ready: Callable[[Path], Awaitable[bool]],
    install: Callable[[Path], Awaitable[None]],
    timeout: float,
) -> Path:
    """`root` once `ready(root)`; otherwise `install(staging)` builds it (within `timeout`) and it is renamed there."""
    if await ready(root):
        return root
    if root in _unavailable:
        raise _unavailable[root]
    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in root.parent.glob(root.name + ".partial-*"):  # left by a killed run; a live one is younger
        if time.time() - stale.stat().st_mtime > 2 * timeout:
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".partial-", dir=root.parent))
    try:
        try:
            await asyncio.wait_for(install(staging), timeout)
        except TimeoutError:
            _unavailable[root] = RegistryUnavailable(f"installing into {root} took over {timeout} s")
            raise _unavailable[root] from None
        except RegistryUnavailable as error:
            _unavailable[root] = error
            raise
        if not await ready(staging):
            raise RuntimeError(f"the install into {staging} finished but left nothing usable")
        if root.exists():
            shutil.rmtree(root)  # broken or from an older layout: ready() said no
        try:
            staging.rename(root)
        except OSError:
            if not await ready(root):  # else another test process installed it first: use theirs
                raise
        return root
    finally:
        shutil.rmtree(staging, ignore_errors=True)
