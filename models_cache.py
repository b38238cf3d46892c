"""The last good /models answer per upstream URL, in memory and in a small JSON file that survives restarts.

SillyTavern's "Connect" button lists models from /models; when the upstream is down the list would stay empty and the
user could not pick a model, although chat may work a minute later. A cached list keeps that working.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


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


def fallback_models_body(model_ids: tuple[str, ...]) -> bytes:
    data = [{"id": model_id, "object": "model", "created": 0, "owned_by": "seaking-proxy"} for model_id in model_ids]
    return json.dumps({"object": "list", "data": data}).encode()


class ModelsCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, CachedModels] | None = None  # read from the file on first use

    def _load(self) -> dict[str, CachedModels]:
        if self._entries is None:
            self._entries = {}
            try:
                stored = json.loads(self.path.read_text(encoding="utf-8"))
                for url, entry in stored.items():
                    self._entries[url] = CachedModels(entry["body"].encode(), float(entry["fetched_at"]))
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                logger.warning(f"models cache {self.path} is unreadable and will be rewritten: {e}")
        return self._entries

    def get(self, url: str) -> CachedModels | None:
        return self._load().get(url)

    def put(self, url: str, body: bytes) -> None:
        entries = self._load()
        entries[url] = CachedModels(body, time.time())
        stored = {u: {"fetched_at": e.fetched_at, "body": e.body.decode("utf-8", "replace")} for u, e in entries.items()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a crash mid-write never leaves half a file for the next start.
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, encoding="utf-8") as tmp:
                json.dump(stored, tmp)
            os.replace(tmp.name, self.path)
        except OSError as e:
            logger.warning(f"cannot write models cache {self.path}: {e}; keeping it in memory only")
