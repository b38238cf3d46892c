"""The replay lab, `python replay.py RECORDING [--config FILE]`, and the recorded SillyTavern sessions in tests/flows/
(made by tests/record_flows.py), each replayed as the regression test it is."""

from __future__ import annotations

import asyncio
import contextlib
import io as text_io
import sys
from pathlib import Path

import pytest
from mitmproxy import io
from mitmproxy.test import tflow

from conftest import chat
from seaking.lab import replay
from seaking.lab.fault_upstream import Hang, Reset, Status, Stream
from test_streaming import read_stream

ROOT = Path(__file__).resolve().parent.parent
FLOWS = ROOT / "tests" / "flows"
CONFIG = FLOWS / "config.yaml"
RECORDINGS = sorted(FLOWS.glob("*.mitm"))
REPLAY_TIMEOUT = 120

pytestmark = pytest.mark.slow  # every test here starts mitmdump processes


async def run_replay(*args: str) -> tuple[int, str, str]:
    """The command users run, as a subprocess: (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "replay.py"), *map(str, args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(REPLAY_TIMEOUT):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, out.decode(), err.decode()


def flows_of(path: Path) -> list:
    with path.open("rb") as fh:
        return list(io.FlowReader(fh).stream())


def test_the_recorded_sessions_cover_what_users_hit():
    names = {p.stem for p in RECORDINGS}
    assert {"retry-503-twice", "retry-503-twice-stream", "mid-stream-drop", "unauthorized-401",
            "models-outage-from-cache", "slow-upstream-heartbeats", "claude-drop-resumed"} <= names


@pytest.mark.parametrize("recording", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_a_recording_is_a_sillytavern_session_with_its_attempts_and_no_key(recording):
    flows = flows_of(recording)
    clients = [f for f in flows if "attempt_of" not in f.metadata["seaking"]]
    attempts = [f for f in flows if "attempt_of" in f.metadata["seaking"]]
    assert clients and all(f.request.headers["user-agent"] == "node-fetch" for f in clients)  # SillyTavern's server
    assert len(attempts) == sum(len(f.metadata["seaking"]["attempts"]) for f in clients)
    assert b"sk-st-recorded-session-key" not in recording.read_bytes()
    # Every credential a placeholder: the Custom source's Bearer key, the Claude source's proxy password.
    assert all(f.request.headers.get("authorization", "Bearer [redacted]") == "Bearer [redacted]" for f in flows)
    assert all(f.request.headers.get("x-api-key", "[redacted]") == "[redacted]" for f in flows)


@pytest.mark.parametrize("recording", RECORDINGS, ids=[p.stem for p in RECORDINGS])
async def test_every_recorded_session_replays_as_it_was_recorded(recording):
    status, out, err = await run_replay(recording, "--config", CONFIG)
    assert status == 0, out + err
    requests = len([f for f in flows_of(recording) if f.metadata["seaking"].get("attempts")])
    assert f"{requests} of {requests} requests agree" in out


async def test_what_the_lab_compares():
    status, out, _ = await run_replay(FLOWS / "models-outage-from-cache.mitm", "--config", CONFIG)
    assert status == 0
    assert "recorded: 503 ×4 → 200 by models cache" in out and "replayed: 503 ×4 → 200 by models cache" in out
    status, out, _ = await run_replay(FLOWS / "slow-upstream-heartbeats.mitm", "--config", CONFIG)
    assert "replayed: 200 → 200 (heartbeats first)" in out
    status, out, _ = await run_replay(FLOWS / "mid-stream-drop.mitm", "--config", CONFIG)
    assert "replayed: 200 → 200, stream ended with stream_interrupted" in out
    status, out, _ = await run_replay(FLOWS / "claude-drop-resumed.mitm", "--config", CONFIG)
    assert "replayed: 200, continuation 200 → 200, resumed after a drop at 18 chars" in out


async def test_a_different_outcome_exits_1_and_shows_both(tmp_path):
    config = tmp_path / "fewer-retries.yaml"
    config.write_text(CONFIG.read_text().replace("deadline: 20", "deadline: 20\n  max_retries: 1"))
    status, out, _ = await run_replay(FLOWS / "retry-503-twice.mitm", "--config", config)
    assert status == 1
    assert "[DIFFER]" in out
    assert "recorded: 503, 503, 200 → 200" in out
    assert "replayed: 503, 503 → 503 by seaking-proxy" in out
    assert "0 of 1 requests agree" in out


def main_exit(*args) -> tuple[int, str]:
    err = text_io.StringIO()
    with contextlib.redirect_stderr(err):
        return replay.main([str(a) for a in args]), err.getvalue()


def test_a_file_that_is_no_recording_exits_2_saying_why(tmp_path):
    garbage = tmp_path / "notes.txt"
    garbage.write_text("hello")
    status, err = main_exit(garbage)
    assert status == 2 and "is not a mitmproxy flow file" in err
    status, err = main_exit(tmp_path / "missing.mitm")
    assert status == 2 and "cannot read" in err


def test_a_recording_not_made_through_the_proxy_exits_2(tmp_path):
    plain = tmp_path / "plain.mitm"
    with plain.open("wb") as fh:
        io.FlowWriter(fh).add(tflow.tflow(resp=True))
    status, err = main_exit(plain)
    assert status == 2 and "holds no flow that seaking-proxy sent upstream" in err


@pytest.mark.parametrize(
    ("config_text", "words"),
    [
        (None, "cannot read the config"),
        ("[a, list]", "is not a mapping"),
        ("{unclosed: [", "cannot read the config"),
        ("error_handling: {max_retries: -1}", "error_handling.max_retries: must be at least 0"),  # the proxy refuses it
    ],
)
def test_a_config_the_lab_cannot_use_exits_2_saying_why(tmp_path, config_text, words):
    config = tmp_path / "config.yaml"
    if config_text is not None:
        config.write_text(config_text)
    status, err = main_exit(FLOWS / "retry-503-twice.mitm", "--config", config)
    assert status == 2 and words in err


def test_a_recording_without_attempt_flows_exits_2(tmp_path):
    without = tmp_path / "without-attempts.mitm"
    with without.open("wb") as fh:
        writer = io.FlowWriter(fh)
        for flow in flows_of(FLOWS / "retry-503-twice.mitm"):
            if "attempt_of" not in flow.metadata["seaking"]:
                writer.add(flow)
    status, err = main_exit(without)
    assert status == 2 and "seaking_attempt_flows" in err


async def test_the_labs_upstream_listens_for_each_upstream_of_the_recording(tmp_path):
    """One reverse listener per upstream the recording talked to, each on a port of its own (mitmproxy refuses
    several on port 0), each serving its own recorded attempts."""
    session = replay.read_recording(FLOWS / "retry-503-twice.mitm")
    session.origins.append("https://other-upstream.example:443")  # as if a fallback target had been tried too
    upstream, listeners = replay.lab_upstream(session, tmp_path)
    try:
        await upstream.start(len(listeners))
        assert sorted(upstream.ports.values()) == sorted(int(url.rsplit(":", 1)[1]) for url in listeners.values())
        assert len(set(listeners.values())) == 2
    finally:
        await upstream.stop()


async def test_a_session_recorded_now_replays_though_first_time_answers_have_no_attempt_flow(
    proxy_factory, upstream, client, tmp_path
):
    """The proxy makes no attempt flow for a request its first attempt answered well: the lab takes that exchange
    from the client flow itself (the stream's too, from the copy of what its client was sent)."""
    recording = tmp_path / "now.mitm"
    proxy = await proxy_factory(flow_list=False, save_stream_file=str(recording))
    assert (await chat(client, proxy)).status == 200
    await read_stream(client, proxy)
    upstream.script("chat/completions", Status(503))
    assert (await chat(client, proxy)).status == 200
    await proxy.stop()
    flows = flows_of(recording)
    assert sum(1 for f in flows if "attempt_of" in f.metadata["seaking"]) == 2  # the retried request's two only
    status, out, err = await run_replay(recording)
    assert status == 0, out + err
    assert "3 of 3 requests agree" in out
    assert "replayed: 200 → 200" in out and "replayed: 503, 200 → 200" in out


async def test_resets_timeouts_and_a_stall_replay_as_they_were_recorded(proxy_factory, upstream, client, tmp_path):
    """Attempts that got no answer (a reset, a timeout) and a stream that went silent: the lab's upstream plays them
    as they happened, and the proxy, configured as when it recorded them, makes the same of them."""
    recording = tmp_path / "faults.mitm"
    config = {
        "target_proxy": {"url": upstream.url + "/v1", "timeout": 0.5},
        "error_handling": {"hedge_on_timeout": False},
        "streaming": {"idle_timeout": 0.5},
    }
    proxy = await proxy_factory(config, flow_list=False, save_stream_file=str(recording))
    upstream.script("chat/completions", Reset())
    assert (await chat(client, proxy)).status == 200
    upstream.script("chat/completions", Hang())
    assert (await chat(client, proxy)).status == 200
    upstream.script("chat/completions", Stream(stall_after=2))
    assert (await read_stream(client, proxy)).errors
    await proxy.stop()
    status, out, err = await run_replay(recording, "--config", proxy.config_path)
    assert status == 0, out + err
    assert "3 of 3 requests agree" in out
    assert "replayed: network, 200 → 200" in out and "replayed: timeout, 200 → 200" in out
    assert "replayed: 200 → 200, stream ended with stream_idle_timeout" in out
