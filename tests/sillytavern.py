"""A real SillyTavern 1.19.0, headless on 127.0.0.1, for tests that check what its users would see.

Tests drive SillyTavern's own backend API (the calls its browser page makes), so whatever SillyTavern's server does with
an upstream's answers (copying statuses, piping SSE, hanging on a dropped stream) is exercised for real:

    root = await ensure_installed()          # npm install once into a cache; SillyTavernUnavailable if offline
    async with SillyTavern(tmp_path) as st:
        await st.store_key("sk-test")
        status, reason, body = await st.generate(proxy_url + "/v1", stream=True, timeout=10)
        status, reason, body = await st.generate_claude(proxy_url, "proxy-password", stream=True, timeout=10)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import aiohttp

from cached_install import RegistryUnavailable, check, install_once, kill_group, run
from seaking.lab.harness import free_port

VERSION = "1.19.0"
GENERATE_PATH = "/api/backends/chat-completions/generate"
INSTALL_TIMEOUT = 600  # seconds; a cold npm install takes about one minute
START_TIMEOUT = 120  # the first start on a machine builds the frontend bundle (20-35 s), later ones take ~3 s
STOP_GRACE = 5

# npm could not fetch SillyTavern (no network, registry down): tests should skip, not fail.
SillyTavernUnavailable = RegistryUnavailable


class _PortTaken(RuntimeError):
    pass


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "seaking-proxy" / f"sillytavern-{VERSION}"
    return Path(os.environ.get("SEAKING_ST_CACHE") or default)


def _installed_version(root: Path) -> str | None:
    try:
        return json.loads((root / "node_modules" / "sillytavern" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


async def ensure_installed() -> Path:
    """The directory whose node_modules holds sillytavern@VERSION, installing it first if needed."""
    npm = shutil.which("npm")
    if npm is None:
        # Not a network problem: a machine without Node must fail loudly rather than skip these tests forever.
        raise RuntimeError("npm is not on PATH: install Node.js (20 or later) to run the SillyTavern tests")

    async def ready(root: Path) -> bool:
        return _installed_version(root) == VERSION

    async def install(staging: Path) -> None:
        # Without a package.json here npm would install into the nearest parent directory that has one.
        (staging / "package.json").write_text('{"name": "seaking-st-cache", "private": true}\n')
        argv = [npm, "install", "--no-audit", "--no-fund", f"sillytavern@{VERSION}"]
        check(f"npm install sillytavern@{VERSION}", *await run(argv, INSTALL_TIMEOUT, cwd=staging))

    return await install_once(cache_dir(), ready, install, INSTALL_TIMEOUT)


def _config(data_root: Path, port: int) -> str:
    config = {
        "dataRoot": str(data_root),
        "listen": False,
        "port": port,
        "protocol": {"ipv4": True, "ipv6": False},
        "dnsPreferIPv6": False,
        "browserLaunch": {"enabled": False},
        "whitelistMode": True,
        "whitelist": ["127.0.0.1"],
        "whitelistDockerHosts": False,  # else it resolves host.docker.internal at every start
        "basicAuthMode": False,
        "enableUserAccounts": False,
        "skipContentCheck": True,
        "enableDownloadableTokenizers": False,
        "extensions": {"enabled": False, "autoUpdate": False, "models": {"autoDownload": False}},
        "enableServerPlugins": False,
    }
    return json.dumps(config, indent=2) + "\n"  # JSON is YAML, and needs no yaml package


class SillyTavern:
    """One SillyTavern server with its own data in `workdir`, and a logged-in client session to it."""

    def __init__(self, workdir: Path, start_timeout: float = START_TIMEOUT) -> None:
        self.workdir = Path(workdir)
        self.start_timeout = start_timeout
        self.log_path = self.workdir / "sillytavern.log"
        self.port: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> SillyTavern:
        package = (await ensure_installed()) / "node_modules" / "sillytavern"
        try:
            for attempt in range(3):  # another process may take our free port before node binds it
                try:
                    await self._start(package)
                    break
                except _PortTaken:
                    await self.close()
                    if attempt == 2:
                        raise
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _start(self, package: Path) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not on PATH: install Node.js (20 or later) to run the SillyTavern tests")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config_path = self.workdir / "sillytavern-config.yaml"
        data_root = self.workdir / "sillytavern-data"
        # SillyTavern builds its frontend bundle (~20-35 s) into dist/_webpack in Docker, else into <dataRoot>/_webpack:
        # share the former so that only the first start on a machine pays, in or out of Docker.
        shared_bundle = package / "dist" / "_webpack"
        shared_bundle.mkdir(parents=True, exist_ok=True)
        data_root.mkdir(exist_ok=True)
        if not (data_root / "_webpack").exists():
            (data_root / "_webpack").symlink_to(shared_bundle, target_is_directory=True)
        config_path.write_text(_config(data_root, self.port))
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self._process = await asyncio.create_subprocess_exec(
                node, str(package / "server.js"), "--configPath", str(config_path),
                cwd=package, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        # unsafe=True: aiohttp's default jar drops cookies set by an IP-address host, and the CSRF token is bound to one.
        self._session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while loop.time() < deadline:
            if self._process.returncode is not None:
                error = _PortTaken if "is already in use" in self.log_tail(5) else RuntimeError
                raise error(f"SillyTavern exited with {self._process.returncode} while starting:\n{self.log_tail()}")
            try:
                async with self._session.get(self.url + "/csrf-token", timeout=aiohttp.ClientTimeout(total=5)) as response:
                    if response.status == 200:
                        self._token = (await response.json())["token"]
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet
            await asyncio.sleep(0.25)
        raise RuntimeError(f"SillyTavern did not answer /csrf-token within {self.start_timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._process is not None:
            await kill_group(self._process, STOP_GRACE)
            self._process = None

    async def _post(self, path: str, payload: dict, timeout: float) -> tuple[int, str, bytes]:
        """POST as SillyTavern's page does; the whole answer must arrive within `timeout` (else TimeoutError)."""
        assert self._session is not None, "use SillyTavern as an async context manager"
        async with asyncio.timeout(timeout):
            async with self._session.post(
                self.url + path, json=payload, headers={"X-CSRF-Token": self._token},
                timeout=aiohttp.ClientTimeout(total=None),  # asyncio.timeout above bounds it
            ) as response:
                return response.status, response.reason or "", await response.read()

    async def store_key(self, value: str, timeout: float = 30) -> None:
        """Save the Custom endpoint's API key, as the key field in API Connections does."""
        status, reason, body = await self._post("/api/secrets/write", {"key": "api_key_custom", "value": value}, timeout)
        if status != 200:
            raise RuntimeError(f"storing the key failed: {status} {reason}: {body[:500]!r}")

    async def list_models(self, custom_url: str, timeout: float = 30) -> tuple[int, object]:
        """The "Connect" button: SillyTavern fetches {custom_url}/models. Returns (status, JSON or text)."""
        payload = {"chat_completion_source": "custom", "custom_url": custom_url, "custom_include_headers": ""}
        status, _, body = await self._post("/api/backends/chat-completions/status", payload, timeout)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    async def generate(
        self, custom_url: str, model: str = "model-a", stream: bool = False, messages: list[dict] | None = None,
        timeout: float = 30, extra: dict | None = None,
    ) -> tuple[int, str, bytes]:
        """A chat turn with the Custom source: (status, reason, body). A stream is read until SillyTavern ends it."""
        payload = {
            "messages": messages if messages is not None else [{"role": "user", "content": "Hello"}],
            "model": model,
            "temperature": 1,
            "frequency_penalty": 0,
            "presence_penalty": 0,
            "top_p": 1,
            "max_tokens": 300,
            "stream": stream,
            "logit_bias": {},
            "chat_completion_source": "custom",
            "user_name": "User",
            "char_name": "Assistant",
            "custom_url": custom_url,
            "custom_include_body": "",
            "custom_exclude_body": "",
            "custom_include_headers": "",
            "custom_prompt_post_processing": "",
            **(extra or {}),
        }
        return await self._post(GENERATE_PATH, payload, timeout)

    async def generate_claude(
        self, reverse_proxy: str, proxy_password: str, model: str = "claude-3-haiku-20240307", stream: bool = False,
        timeout: float = 30,
    ) -> tuple[int, str, bytes]:
        """A chat turn with the Claude source and a reverse proxy, as its page posts it: SillyTavern's server sends
        POST {reverse_proxy}/messages with the proxy password as x-api-key. (The model is one that none of its
        thinking or sampling rules match, so the request stays plain.)"""
        payload = {
            "messages": [{"role": "user", "content": "Hello"}],
            "model": model,
            "temperature": 1,
            "top_p": 1,
            "top_k": 0,
            "max_tokens": 300,
            "stream": stream,
            "chat_completion_source": "claude",
            "reverse_proxy": reverse_proxy,
            "proxy_password": proxy_password,
            "use_sysprompt": False,
            "assistant_prefill": "",
            "stop": [],
            "user_name": "User",
            "char_name": "Assistant",
        }
        return await self._post(GENERATE_PATH, payload, timeout)
