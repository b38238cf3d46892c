"""config.yaml into the shared state, and what the proxy needs from mitmproxy's own options and from the process.

The `seaking_config` option names the file (config.yaml beside addon.py by default); a file that does not validate
stops start-up with a message naming the key (raised as OptionsError, which mitmproxy reports and exits on).
While the proxy runs, the file is reloaded when it changes (a polling task, as mitmproxy watches its scripts, but twice
a second), by the `seaking.reload` command, and when the option itself changes (mitmweb's Options editor). A file that
does not validate then changes nothing: its error is logged once, and the proxy goes on with the config it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import logging
from pathlib import Path

from mitmproxy import command, ctx, exceptions
from mitmproxy.proxy import mode_specs

from retry_policy import RetryBudget
from seaking.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from seaking.models_cache import ModelListStore
from seaking.outbound import proxy_for
from seaking.shared import Shared, Snapshot
from seaking.targets import CircuitBreaker, Target, TargetPool
from seaking.upstream_run import Failover

logger = logging.getLogger("seaking")


# How often the config file is checked for changes: an edit takes effect within about a second.
RELOAD_CHECK_SECONDS = 0.5


def file_version(path: Path) -> bytes | None:
    """What the config file holds now (None: it cannot be read). A few hundred bytes: comparing them catches every
    change, even one within the file system's mtime resolution, and ignores a save that changed nothing."""
    try:
        return path.read_bytes()
    except OSError:
        return None


class Settings:
    """mitmproxy addon: the seaking_config option and its reloads, and the mitmproxy options the proxy depends on."""

    name = "seaking.settings"  # every addon of the proxy is named seaking.*: addon names share one namespace

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._seen: bytes | None = None  # the version of the file last loaded, or last refused
        self._watcher: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "seaking_config", str, "",
            f"seaking-proxy config file (YAML or JSON), reloaded when it changes. Default: {DEFAULT_CONFIG_PATH}",
        )
        # With mitmproxy's default (eager), an unreachable target closes every client connection before any hook
        # runs. We answer everything ourselves, so mitmproxy should connect only when a flow asks it to — from the
        # very first connection, so this is set as soon as the addon is loaded, before mitmproxy listens.
        loader.master.options.update(connection_strategy="lazy")

    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")
        if updated & {"seaking_config", "mode", "listen_host"} or not self.shared.loaded:
            # A bad file or path raises, and mitmproxy rolls the option back (mitmweb's Options editor too).
            try:
                self._load(config_path())
            except ConfigError as e:
                raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        # What is loaded by now (mitmproxy, aiohttp, this addon) lives as long as the process. Freezing it keeps it out
        # of every later full garbage collection, which would otherwise walk it while streams wait: 50-90 ms pauses of
        # the event loop under 100 streams (measured with py-spy and GC callbacks).
        gc.collect()
        gc.freeze()

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    @command.command("seaking.reload")
    def reload_command(self) -> str:
        """Read the seaking-proxy config file again now (it is also reloaded by itself when it changes)."""
        try:
            return self._load(config_path())
        except ConfigError as e:
            raise exceptions.CommandError(str(e)) from None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_CHECK_SECONDS)
            path = config_path()
            if file_version(path) != self._seen:
                with contextlib.suppress(ConfigError):  # logged; the running config stays
                    self._load(path)

    def _load(self, path: Path) -> str:
        """Load the config file as the shared snapshot, or change nothing and raise ConfigError (logged once per
        version of the file). Requests already under way keep the snapshot they started with. Targets still
        configured keep their breaker and statistics."""
        version = file_version(path)
        shared = self.shared
        previous = shared.snapshot if shared.loaded else None
        try:
            config = load_config(path)
            problem = exposure_problem(config, ctx.options.listen_host, ctx.options.mode)
            if problem:
                raise ConfigError(problem)
            failover = build_failover(config, ctx.options.mode, previous=previous.failover if previous else None)
        except ConfigError as e:
            error = ConfigError(f"seaking-proxy config {path}: {e}")
            if previous is not None and version != self._seen:
                logger.error(f"{error}; still running on the config loaded before")
            self._seen = version
            raise error from None
        self._seen = version
        models = previous.models if previous and previous.models.path == config.models_cache_path else None
        shared.swap(Snapshot(config, failover, models or ModelListStore(config.models_cache_path)))
        kept = len(_breakers(failover) & _breakers(previous.failover)) if previous else 0
        message = f"seaking-proxy config {path} loaded: {len(failover.targets)} target(s), {kept} kept with their state"
        if previous is not None:
            logger.info(message)
        return message


def _breakers(failover: Failover) -> set[int]:
    return {id(t.breaker) for t in failover.targets}


def config_path() -> Path:
    return Path(ctx.options.seaking_config or DEFAULT_CONFIG_PATH)


def build_failover(config: Config, modes: list[str], previous: Failover | None = None) -> Failover:
    """The targets, budget and fallbacks of `config`. A target that `previous` had too (the same URL through the same
    proxy) keeps its circuit breaker and statistics: a new key or weight does not change how the upstream is doing.
    Its Target object is a new one all the same, so that requests under way keep the key they started with."""
    primary = config.target_proxy.url or reverse_target(modes)
    if primary is None:
        raise ConfigError("seaking-proxy needs an upstream: run mitmproxy with --mode reverse:<url>, or set target_proxy.url")
    sections = [(primary, config.target_proxy.api_key, config.target_proxy.weight, config.target_proxy.proxy,
                 config.target_proxy.prefill)]
    sections += [(t.url, t.api_key, t.weight, t.proxy, t.prefill) for t in config.targets]
    try:
        proxies = [proxy_for(url, proxy) for url, _, _, proxy, _ in sections]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    earlier: dict[tuple, list[Target]] = {}
    for target in previous.targets if previous else ():
        earlier.setdefault((target.base_url, target.proxy), []).append(target)
    settings = config.circuit_breaker
    targets = []
    for (url, api_key, weight, _, prefill), proxy in zip(sections, proxies):
        same = earlier.get((url, proxy))
        if same:
            target = dataclasses.replace(same.pop(0), api_key=api_key, weight=weight, prefill=prefill)
            target.breaker.failure_threshold, target.breaker.open_seconds = settings.failure_threshold, settings.open_seconds
        else:
            breaker = CircuitBreaker(settings.failure_threshold, settings.open_seconds)
            target = Target(url, api_key, weight, breaker, proxy, prefill=prefill)
        targets.append(target)
    # The retry budget counts the traffic of the last seconds: it carries over too.
    budget = previous.budget if previous and previous.budget else RetryBudget(0, 0)
    budget.percent, budget.min_per_second = config.retry_budget.percent, config.retry_budget.min_per_second
    return Failover(TargetPool(targets, config.load_balancing), budget, config.model_fallbacks)


def reverse_target(modes: list[str]) -> str | None:
    """The first --mode reverse:<url> target, as a base URL."""
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        if isinstance(mode, mode_specs.ReverseMode):
            scheme = "https" if mode.scheme in ("https", "http3", "tls", "dtls", "quic") else "http"
            host, port = mode.address
            default = {"http": 80, "https": 443}[scheme]
            netloc = f"[{host}]" if ":" in host else host
            return f"{scheme}://{netloc}" + ("" if port == default else f":{port}")
    return None


def exposure_problem(config: Config, listen_host: str, modes: list[str]) -> str | None:
    """With the key in the proxy and no access key, a proxy reachable from the network spends the key for anyone."""
    holds_a_key = config.target_proxy.api_key or any(t.api_key for t in config.targets)
    if not holds_a_key or config.server.access_key:
        return None
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        host = mode.listen_host(listen_host)
        if not _is_loopback(host):
            where = f"on {host}" if host else "on all network interfaces"
            return (
                f"target_proxy.api_key is set but server.access_key is not, and mitmproxy would listen {where}: "
                f"anyone who can reach this port could spend your upstream key. Either listen on loopback only "
                f"(--listen-host 127.0.0.1) or set server.access_key (or the SEAKING_ACCESS_KEY environment variable)."
            )
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
