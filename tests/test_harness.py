"""The lab's harness (seaking/lab/harness.py): mitmproxy's "listening at" lines, and mitmdump started with one or
several listeners, as the tests, the replay lab and the benchmarks start it."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from seaking.lab import harness
from seaking.lab.fault_upstream import Received, assistant_start
from seaking.lab.harness import Mitmdump, MitmdumpFailed, free_ports, listeners

ROOT = Path(__file__).parent.parent

# As mitmdump 11.0.2 and 12.3.1 print them (the same words in both).
MITMDUMP_LINES = """\
[01:20:51.930] Loading script /work/addon.py
[01:20:51.930] reverse proxy to http://127.0.0.1:9 listening at 127.0.0.1:45321.
[01:20:51.930] reverse proxy to http://127.0.0.1:10 listening at 127.0.0.1:45322.
[01:20:51.930] HTTP(S) proxy listening at 127.0.0.1:45323.
[01:20:51.931] SOCKS v5 proxy listening at *:45324.
[01:20:51.932] reverse proxy to https://api.example.com:443 listening at [::1]:45325.
[01:20:51.933] HTTP(S) proxy (upstream mode) listening at 127.0.0.1:45326 and [::1]:45326.
"""
NOT_PROXIES = """\
[01:20:09.062] Web server listening at http://127.0.0.1:0/
[01:20:33.004] Web server listening at http://127.0.0.1:8081/?token=55a60c83da9e3b2548f8ee2ffbdb9106
fault upstream listening at http://127.0.0.1:9000
[01:21:00.000] reverse proxy to http://127.0.0.1:9 stopped.
"""

pytestmark = pytest.mark.slow  # every test here starts mitmdump processes


def test_every_proxy_servers_line_gives_its_port_by_mode():
    assert listeners(MITMDUMP_LINES) == {
        "reverse proxy to http://127.0.0.1:9": 45321,
        "reverse proxy to http://127.0.0.1:10": 45322,
        "HTTP(S) proxy": 45323,
        "SOCKS v5 proxy": 45324,
        "reverse proxy to https://api.example.com:443": 45325,
        "HTTP(S) proxy (upstream mode)": 45326,
    }


def test_mitmwebs_web_server_and_other_lines_are_no_proxy():
    assert listeners(NOT_PROXIES) == {}
    assert listeners(NOT_PROXIES + MITMDUMP_LINES.splitlines()[1]) == {"reverse proxy to http://127.0.0.1:9": 45321}


def test_the_benchmark_upstreams_line_reads_as_one_too():
    assert listeners("bench upstream listening at 127.0.0.1:40001\n") == {"bench upstream": 40001}


def test_free_ports_differ_and_are_free():
    ports = free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


async def test_mitmdump_with_several_reverse_listeners():
    """Each --mode on a port of its own: start() waits for all of them; ports has each by its mode."""
    first, second, dead = free_ports(3)
    proxy = Mitmdump("--mode", f"reverse:http://127.0.0.1:{dead}@{first}",
                     "--mode", f"reverse:http://127.0.0.1:{dead + 1}@{second}", addon=False)
    try:
        assert await proxy.start(listeners=2) == f"http://127.0.0.1:{first}"
        assert proxy.ports == {f"reverse proxy to http://127.0.0.1:{dead}": first,
                               f"reverse proxy to http://127.0.0.1:{dead + 1}": second}
    finally:
        assert await proxy.stop() == 0


async def test_mitmdump_that_exits_while_starting_says_so_with_its_output():
    """mitmproxy refuses several listeners on port 0, and exits."""
    proxy = Mitmdump("--mode", "reverse:http://127.0.0.1:9@0", "--mode", "reverse:http://127.0.0.1:10@0", addon=False)
    with pytest.raises(MitmdumpFailed, match="Cannot spawn multiple servers on the same address"):
        await proxy.start(listeners=2)
    assert proxy.process.returncode != 0
    await proxy.stop()


async def test_a_mitmdump_never_started_stops_as_nothing():
    assert await Mitmdump().stop() is None


async def test_a_process_that_neither_listens_nor_stops_is_given_up_on_then_killed(monkeypatch):
    """What the harness does with a mitmdump stuck before it listens and deaf to SIGINT: says so, then SIGKILL."""
    monkeypatch.setattr(harness, "STOP_TIMEOUT", 0.5)
    stuck = Mitmdump(addon=False)
    stuck.args = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"]
    with pytest.raises(MitmdumpFailed, match="did not start listening within 0.5 s"):
        await stuck.start(timeout=0.5)
    assert await stuck.stop() == -signal.SIGKILL


async def test_the_fault_upstream_runs_as_a_process_until_sigint():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "seaking.lab.fault_upstream", "--port", "0", cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        [(label, port)] = listeners(line.decode()).items()
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/v1/models") as answer:
            assert label == "fault upstream" and answer.status == 200 and (await answer.json())["data"]
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 10) == 0


@pytest.mark.parametrize(
    ("messages", "start"),
    [
        ([{"role": "user", "content": "Hi"}], None),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once"}], "Once"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Once"}, "odd"]}], "Once"),
        ([], None),
    ],
)
def test_the_fault_upstream_knows_a_continuation_by_its_last_message(messages, start):
    assert assistant_start(Received("POST", "/v1/chat/completions", {}, json.dumps({"messages": messages}).encode())) == start
