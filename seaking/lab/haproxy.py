"""HAProxy in front of several seaking-proxy processes, as docs/haproxy.cfg sets it up (for the tests and the
benchmarks)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "docs" / "haproxy.cfg"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy")


def haproxy_config(listen_port: int, ports: list[int]) -> str:
    """docs/haproxy.cfg on these ports: its frontend on `listen_port`, one server line per process port."""
    servers = "\n".join(f"    server seaking{i + 1} 127.0.0.1:{p}" for i, p in enumerate(ports))
    template = re.sub(r"(?m)^    server seaking\d+ 127\.0\.0\.1:\d+\n?", "", CONFIG.read_text()).rstrip()
    return (template + "\n" + servers + "\n").replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:{listen_port}")
