"""relay.py and models_cache.py on their own: a real loopback server and a real file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import seaking.relay as relay_module
from seaking.models_cache import ModelListStore, fallback_models_body, is_models_list
from seaking.relay import TOKEN_HEADER, Head, Relay

ROOT = Path(__file__).resolve().parent.parent


class Job:
    """A relay job (relay.RelayJob) with a fixed head and body, that says when it is closed."""

    streamed, shown_url = True, None

    def __init__(self, status: int, headers: list, parts: list[bytes], on_close) -> None:
        self.status, self.headers, self.parts, self.on_close = status, headers, parts, on_close

    async def head(self) -> Head:
        return Head(self.status, self.headers)

    async def body(self):
        for part in self.parts:
            yield part

    async def aclose(self) -> None:
        self.on_close()


@pytest.fixture
async def relay():
    server = Relay()
    await server.start()
    yield server
    await server.stop()


async def test_a_job_is_served_once_then_its_token_is_gone(relay, client):
    closed = []
    token = relay.register(Job(201, [("x-kind", "test")], [b"a", b"b"], on_close=lambda: closed.append(1)))
    url, headers = f"http://127.0.0.1:{relay.port}/v1/chat/completions", {TOKEN_HEADER: token}
    async with client.get(url, headers=headers) as response:
        assert (response.status, response.headers["x-kind"], await response.read()) == (201, "test", b"ab")
    assert closed == [1]
    async with client.get(url, headers=headers) as response:
        assert response.status == 404
    assert relay.pending == 0


async def test_an_uncollected_job_expires_and_is_closed(relay, monkeypatch):
    monkeypatch.setattr(relay_module, "PICKUP_SECONDS", 0.05)
    closed = asyncio.Event()
    relay.register(Job(200, [], [b"never sent"], on_close=closed.set))
    await asyncio.wait_for(closed.wait(), 2)
    assert relay.pending == 0


async def test_stopping_closes_pending_jobs():
    server = Relay()
    await server.start()
    closed = []
    server.register(Job(200, [], [], on_close=lambda: closed.append(1)))
    await server.stop()
    assert closed == [1]


async def test_the_relay_listens_on_loopback_only(relay):
    assert relay._runner.addresses[0][0] == "127.0.0.1"
    assert await relay.start() == relay.port  # idempotent


def test_models_cache_survives_a_new_instance(tmp_path):
    path = tmp_path / "sub" / "models.json"
    ModelListStore(path).put("http://u/v1/models", b'{"data": [{"id": "m"}]}')
    cached = ModelListStore(path).get("http://u/v1/models")
    assert cached.body == b'{"data": [{"id": "m"}]}'
    assert cached.age() == 0 and cached.age(now=cached.fetched_at + 90) == 90
    assert ModelListStore(path).get("http://other/v1/models") is None


def test_the_model_ids_are_those_the_lists_name_whatever_a_hand_edited_file_holds(tmp_path):
    path = tmp_path / "models.json"
    lists = {"a": '{"data": [{"id": "m1"}, {"id": 2}, "m3"]}', "b": "not json", "c": "[1]", "d": '{"data": {"id": "m4"}}'}
    path.write_text(json.dumps({url: {"body": body, "fetched_at": 1} for url, body in lists.items()}))
    cache = ModelListStore(path)
    assert cache.get("a") is not None and cache.model_ids() == {"m1"}


def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, caplog):
    path = tmp_path / "models.json"
    path.write_text("{not json")
    cache = ModelListStore(path)
    assert cache.get("u") is None
    assert "unreadable" in caplog.text
    cache.put("u", b'{"data": []}')
    assert json.loads(path.read_text())["u"]["body"] == '{"data": []}'


def test_an_unwritable_cache_keeps_working_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = ModelListStore(blocker / "models.json")  # its parent is a file: cannot be created
    cache.put("u", b'{"data": []}')
    assert cache.get("u").body == b'{"data": []}'
    assert "in memory only" in caplog.text


def test_model_list_helpers():
    assert is_models_list(b'{"object": "list", "data": []}')
    assert not is_models_list(b'{"data": {}}') and not is_models_list(b"nope")
    assert json.loads(fallback_models_body(("a",)))["data"][0] == {"id": "a", "object": "model", "created": 0, "owned_by": "seaking-proxy"}



WRITER = """
import sys
from pathlib import Path
from seaking.models_cache import ModelListStore
store = ModelListStore(Path(sys.argv[1]))
for i in range(40):
    store.put(f"http://{sys.argv[2]}/v1/models?n={i}", b'{"data": []}')
"""


@pytest.mark.slow
def test_processes_sharing_the_cache_file_lose_none_of_each_others_lists(tmp_path):
    """Proxies behind a load balancer share one file: every write keeps what the others wrote."""
    path = tmp_path / "models.json"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"writer{n}"], cwd=ROOT) for n in range(4)
    ]
    assert [w.wait(60) for w in writers] == [0] * 4
    stored = json.loads(path.read_text())
    assert len(stored) == 4 * 40
    fresh = ModelListStore(path)
    assert fresh.get("http://writer3/v1/models?n=39") is not None


def test_a_list_another_process_wrote_is_found_without_a_restart(tmp_path):
    path = tmp_path / "models.json"
    mine = ModelListStore(path)
    mine.put("http://a/v1/models", b'{"data": ["old"]}')
    theirs = ModelListStore(path)
    theirs.put("http://b/v1/models", b'{"data": ["b"]}')
    theirs.put("http://a/v1/models", b'{"data": ["newer"]}')
    assert mine.get("http://b/v1/models").body == b'{"data": ["b"]}'
    assert mine.get("http://a/v1/models").body == b'{"data": ["newer"]}'


async def test_a_client_gone_while_its_answer_is_written_ends_the_job_quietly(relay, client, monkeypatch, caplog):
    """Under load a write can meet mitmproxy's side already closing (the client left) before the handler is
    cancelled: aiohttp raises ClientConnectionResetError. The relay's handler ends there, quietly, and closes the job."""
    from aiohttp import ClientConnectionResetError, web

    written = []

    async def write(self, data):
        written.append(data)
        if len(written) == 2:
            raise ClientConnectionResetError("Cannot write to closing transport")

    monkeypatch.setattr(web.StreamResponse, "write", write)
    closed = asyncio.Event()
    token = relay.register(Job(200, [], [b"a", b"b", b"c"], on_close=closed.set))
    url = f"http://127.0.0.1:{relay.port}/v1/chat/completions"
    with contextlib.suppress(Exception):
        async with client.get(url, headers={TOKEN_HEADER: token}) as response:
            await response.read()
    await asyncio.wait_for(closed.wait(), 2)
    assert written == [b"a", b"b"]
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text
