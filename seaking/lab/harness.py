"""Starting mitmdump and fake upstreams, as the tests, the replay lab and the benchmarks do: one way for all three.

  Mitmdump ............ `mitmdump` (or `mitmweb`) as a subprocess listening on 127.0.0.1, its output read all along;
                        start() waits for its "listening at" lines and returns the first listener's URL, and `ports`
                        holds every listener's port by its mode's description
  LISTENING ........... the "listening at" line of a proxy server of mitmproxy (not mitmweb's web server)
  listeners() ......... the ports of those lines in some output, by mode description
  free_port(s) ........ ports nothing listens on at 127.0.0.1 now
  running_upstreams() . FaultyUpstreams (fault_upstream.py) in this event loop, all stopped on exit

mitmproxy 11 and 12 print one line per proxy server once it listens, "<its mode's description> listening at
<address>[ and <address>].", e.g.

    [12:00:00.000] reverse proxy to http://127.0.0.1:9000 listening at 127.0.0.1:8080.
    [12:00:00.000] HTTP(S) proxy listening at 127.0.0.1:8081.
    [12:00:00.000] reverse proxy to http://127.0.0.1:9 listening at *:8082.

and mitmweb prints its web server's as "Web server listening at http://127.0.0.1:8081/", which is no proxy.
Several `--mode`s each need a port of their own (`reverse:URL@PORT`): both versions refuse two listeners on port 0
("Cannot spawn multiple servers on the same address").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from seaking.lab.fault_upstream import FaultyUpstream

ROOT = Path(__file__).resolve().parents[2]
ADDON = ROOT / "addon.py"
START_TIMEOUT = 30.0  # seconds until it listens
STOP_TIMEOUT = 10.0  # seconds after SIGINT before it is killed

LISTENING = re.compile(
    r"^(?:\[[\d:.]+\] )?"  # mitmdump's timestamp
    r"(?P<mode>\S.*?) listening at "
    r"(?P<host>\*|\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):(?P<port>\d+)"  # host:port, *:port or [v6]:port, never a URL
    r"(?: and \S+)*\.?\r?$",  # a server on several addresses names them all, on one port
    re.MULTILINE,
)


def listeners(output: str) -> dict[str, int]:
    """mode description -> port, for every "listening at" line of a proxy server in `output`, in order."""
    return {found["mode"]: int(found["port"]) for found in LISTENING.finditer(output)}


def executable(program: str) -> str:
    """mitmproxy's program beside this interpreter (its venv), else on PATH."""
    beside = Path(sys.executable).with_name(program)
    return str(beside) if beside.exists() else shutil.which(program) or program


def free_ports(count: int) -> list[int]:
    """`count` different ports that nothing listens on at 127.0.0.1 now (all held open while they are picked)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1 now: for a program that cannot pick one itself and say which, or a
    target that refuses connections."""
    return free_ports(1)[0]


class MitmdumpFailed(RuntimeError):
    """It exited, or did not listen in time, while starting; the message holds its output."""


class Mitmdump:
    """`mitmdump -s addon.py --listen-host 127.0.0.1 --listen-port PORT ARGS...`, the command users run, as a
    subprocess. program="mitmweb" runs mitmweb; addon=False runs plain mitmproxy (an outbound proxy, the replay lab's
    upstream), addon=PATH another script. Its output is read all along (a full pipe would block it) into `output`.
    Not started until start(), spawn() or run_to_exit(); stop() ends it."""

    def __init__(
        self,
        *args: str,
        program: str = "mitmdump",
        addon: bool | Path = True,
        port: int = 0,
        env: dict | None = None,
        cwd: Path | None = None,
    ) -> None:
        script = ["-s", str(ADDON if addon is True else addon)] if addon else []
        self.program = program
        self.args = [executable(program), *script, "--listen-host", "127.0.0.1", "--listen-port", str(port), *args]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None
        self.output = ""
        self.ports: dict[str, int] = {}  # mode description -> port, as its "listening at" lines come
        self._reader: asyncio.Task | None = None
        self._read = asyncio.Event()  # set after each line, and at the end of the output

    @property
    def url(self) -> str:
        """The first listener's URL."""
        return f"http://127.0.0.1:{next(iter(self.ports.values()))}"

    async def spawn(self) -> None:
        """Start it without waiting for it to listen."""
        self.process = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, env=self.env, cwd=self.cwd,
        )
        self._reader = asyncio.create_task(self._read_output())

    async def _read_output(self) -> None:
        try:
            while line := await self.process.stdout.readline():
                self._line(line.decode(errors="replace"))
                self._read.set()
        finally:
            self._read.set()

    def _line(self, text: str) -> None:
        """One line of its output: kept, and read for a port it listens on."""
        self.output += text
        if found := LISTENING.search(text):
            self.ports[found["mode"]] = int(found["port"])

    async def start(self, listeners: int = 1, timeout: float = START_TIMEOUT) -> str:
        """Start it and wait until `listeners` proxy servers listen; the first one's URL. MitmdumpFailed, with the
        output, if it exits instead or takes longer than `timeout` seconds."""
        await self.spawn()
        try:
            async with asyncio.timeout(timeout):
                while len(self.ports) < listeners:
                    if self._reader.done():
                        await self.process.wait()
                        raise MitmdumpFailed(f"{self.program} exited with {self.process.returncode}:\n{self.output}")
                    self._read.clear()
                    await self._read.wait()
        except TimeoutError:
            raise MitmdumpFailed(
                f"{self.program} did not start listening within {timeout:g} s:\n{self.output}"
            ) from None
        return self.url

    async def run_to_exit(self, timeout: float = START_TIMEOUT) -> int:
        """For start-ups that must fail: mitmproxy logs the error, may open its listener, then exits. Its exit code."""
        await self.spawn()
        async with asyncio.timeout(timeout):
            await self.process.wait()
            await self._reader
        return self.process.returncode

    async def stop(self) -> int | None:
        """SIGINT (mitmproxy's clean exit), SIGKILL after STOP_TIMEOUT seconds; its exit code (None if not started)."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, 5)
        return self.process.returncode


@contextlib.asynccontextmanager
async def running_upstreams() -> AsyncIterator[Callable[..., Awaitable[FaultyUpstream]]]:
    """start(port=0) runs a FaultyUpstream on 127.0.0.1; all are stopped on exit."""
    started: list[FaultyUpstream] = []

    async def start(port: int = 0) -> FaultyUpstream:
        server = FaultyUpstream()
        await server.start(port)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.stop()
