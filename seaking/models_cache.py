"""The last good /models answer per upstream URL, in memory and in a small JSON file that survives restarts.

SillyTavern's "Connect" button lists models from /models; when the upstream is down the list would stay empty and the
user could not pick a model, although chat may work a minute later. A cached list keeps that working.
`ModelsCache` is the mitmproxy addon; `ModelListStore` the store behind it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mitmproxy import http

from retry_policy import Verdict
from seaking.flows import is_client_flow
from seaking.records import AnsweredBy, FlowRecord
from seaking.routing import MODELS_ENDPOINT, route

if TYPE_CHECKING:
    from seaking.shared import Shared

logger = logging.getLogger("seaking")

CACHE_HEADER = "x-seaking-cache"


@dataclass(frozen=True)
class CachedModels:
    body: bytes
    fetched_at: float  # epoch seconds

    def age(self, now: float | None = None) -> int:
        return max(0, int((time.time() if now is None else now) - self.fetched_at))


def is_models_list(body: bytes) -> bool:
    """Only a real model list is worth caching: {"data": [...]}."""
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and isinstance(document.get("data"), list)


def _listed(body: bytes) -> list[dict]:
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return []
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] if isinstance(data, list) else []


def fallback_models_body(model_ids: tuple[str, ...]) -> bytes:
    data = [{"id": model_id, "object": "model", "created": 0, "owned_by": "seaking-proxy"} for model_id in model_ids]
    return json.dumps({"object": "list", "data": data}).encode()


class ModelListStore:
    """The lists in memory, and in a JSON file that survives restarts and that several proxy processes may share
    (behind a load balancer, see docs/running.md). A write merges what the other processes wrote since (the
    newer list per URL wins) under an exclusive lock on a file beside it, and replaces the file atomically, so neither
    a concurrent writer nor a crash mid-write loses what is there. A read picks up the file again when it changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, CachedModels] = {}
        self._read_version: tuple[int, int] | None = None  # (mtime_ns, size) of the file as last read
        self._ids: tuple[dict[str, CachedModels], frozenset[str]] | None = None  # the ids of which entries

    def model_ids(self) -> frozenset[str]:
        """Every model id the lists name (what the upstreams listed)."""
        if self._ids is None or self._ids[0] != self._entries:
            ids = {m["id"] for cached in self._entries.values() for m in _listed(cached.body)}
            self._ids = (dict(self._entries), frozenset(ids))
        return self._ids[1]

    def get(self, url: str) -> CachedModels | None:
        self._merge_file()
        return self._entries.get(url)

    def put(self, url: str, body: bytes) -> None:
        self._entries[url] = CachedModels(body, time.time())  # memory first: kept even if the file cannot be written
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(self.path.with_name(self.path.name + ".lock")):
                self._merge_file()
                stored = {u: {"fetched_at": e.fetched_at, "body": e.body.decode("utf-8", "replace")}
                          for u, e in self._entries.items()}
                with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, encoding="utf-8") as tmp:
                    json.dump(stored, tmp)
                os.replace(tmp.name, self.path)
                self._read_version = _version(self.path)
        except OSError as e:
            logger.warning(f"cannot write models cache {self.path}: {e}; keeping it in memory only")

    def _merge_file(self) -> None:
        """Take in the file's lists that are newer than ours, if the file changed since it was last read."""
        version = _version(self.path)
        if version is None or version == self._read_version:
            return
        self._read_version = version
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            found = {url: CachedModels(entry["body"].encode(), float(entry["fetched_at"]))
                     for url, entry in stored.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning(f"models cache {self.path} is unreadable and will be rewritten: {e}")
            return
        for url, cached in found.items():
            if url not in self._entries or cached.fetched_at > self._entries[url].fetched_at:
                self._entries[url] = cached


def _version(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between processes, held while the block runs (flock on POSIX, msvcrt on Windows)."""
    with open(lock_path, "a+b") as lock:
        if os.name == "nt":  # pragma: no cover - CI runs on Linux; Windows users run this (docs/running.md)
            import msvcrt

            lock.seek(0)
            msvcrt.locking(lock.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises OSError
            try:
                yield
            finally:
                lock.seek(0)
                msvcrt.locking(lock.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class ModelsCache:
    """mitmproxy addon, after the Exchange: keeps each good /models answer, and answers /models from the last one
    (or from models.fallback) when the upstream is unavailable. A 401 or 404 is not an outage: the user needs to see
    it, not a stale list."""

    name = "seaking.models_cache"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def request(self, flow: http.HTTPFlow) -> None:
        record = self.shared.records.peek(flow) if is_client_flow(flow) and flow.response is not None else None
        if record is None or record.endpoint != MODELS_ENDPOINT:
            return
        if record.verdict is Verdict.SUCCESS:  # (none for a request the shutdown ended early)
            if is_models_list(flow.response.content):
                self.shared.snapshot.models.put(flow.request.url, flow.response.content)
        elif record.verdict is Verdict.RETRY:
            self._answer_from_store(flow, record)

    def _answer_from_store(self, flow: http.HTTPFlow, record: FlowRecord) -> None:
        snapshot = self.shared.snapshot
        why = f"upstream unavailable ({record.attempts[-1].detail})"
        stored = (snapshot.models.get(route(t.base_url, record.client_path).url) for t in snapshot.failover.targets)
        cached = next((c for c in stored if c), None)
        if cached is not None:
            age = cached.age()
            logger.warning(f"/models: {why}; serving the list cached {age} s ago")
            answer = _json_response(cached.body, {CACHE_HEADER: f"stale; age={age}", "age": str(age)})
            answered_by = AnsweredBy.MODELS_CACHE
        elif snapshot.config.models.fallback:
            logger.warning(f"/models: {why}; serving models.fallback")
            answer = _json_response(fallback_models_body(snapshot.config.models.fallback), {CACHE_HEADER: "fallback"})
            answered_by = AnsweredBy.MODELS_FALLBACK
        else:
            return
        # Where the answer would have come from: the exchange's x-seaking-* headers stay.
        answer.headers.update({k: v for k, v in flow.response.headers.items() if k.lower().startswith("x-seaking-")})
        flow.response = answer
        record.answered_by, record.status = answered_by, 200


def _json_response(body: bytes, headers: dict[str, str]) -> http.Response:
    return http.Response.make(200, body, {"content-type": "application/json", **headers})
