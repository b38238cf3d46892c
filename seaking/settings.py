"""config.yaml into the shared state, and what the proxy needs from mitmproxy's own options and from the process.

The `seaking_config` option names the file (config.yaml beside addon.py by default); a file that does not validate
stops start-up with a message naming the key (raised as OptionsError, which mitmproxy reports and exits on).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress

from mitmproxy import ctx, exceptions
from mitmproxy.proxy import mode_specs

from retry_policy import RetryBudget
from seaking.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from seaking.models_cache import ModelListStore
from seaking.targets import CircuitBreaker, Target, TargetPool
from seaking.upstream import Failover


class Settings:
    """mitmproxy addon: the seaking_config option, and the mitmproxy options the proxy depends on."""

    name = "seaking.settings"  # every addon of the proxy is named seaking.*: addon names share one namespace

    def __init__(self, shared) -> None:
        self.shared = shared

    def load(self, loader) -> None:
        loader.add_option(
            "seaking_config", str, "", f"seaking-proxy config file (YAML or JSON). Default: {DEFAULT_CONFIG_PATH}"
        )
        if "store_streamed_bodies" not in loader.master.options:  # mitmproxy 12 has it built in, 11 does not
            loader.add_option(
                "store_streamed_bodies", bool, False, "Keep the bodies of streamed responses in the flow (mitmweb, -w)."
            )
            self.shared.relay.records_streamed_bodies = True
        # With mitmproxy's default (eager), an unreachable target closes every client connection before any hook
        # runs. We answer everything ourselves, so mitmproxy should connect only when a flow asks it to — from the
        # very first connection, so this is set as soon as the addon is loaded, before mitmproxy listens.
        loader.master.options.update(connection_strategy="lazy")

    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")
        shared = self.shared
        if "seaking_config" in updated or shared.config is None:
            path = ctx.options.seaking_config or DEFAULT_CONFIG_PATH
            try:
                shared.config = load_config(path)
            except ConfigError as e:
                raise exceptions.OptionsError(f"seaking-proxy config {path}: {e}") from None
            shared.models = ModelListStore(shared.config.models_cache_path)
        if updated & {"seaking_config", "mode"} or shared.failover is None:
            shared.failover = build_failover(shared.config, ctx.options.mode)
        if updated & {"seaking_config", "listen_host", "mode"}:
            problem = exposure_problem(shared.config, ctx.options.listen_host, ctx.options.mode)
            if problem:
                raise exceptions.OptionsError(problem)

    def running(self) -> None:
        # What is loaded by now (mitmproxy, aiohttp, this addon) lives as long as the process. Freezing it keeps it out
        # of every later full garbage collection, which would otherwise walk it while streams wait: 50-90 ms pauses of
        # the event loop under 100 streams (measured with py-spy and GC callbacks).
        gc.collect()
        gc.freeze()

    def done(self) -> None:
        # done must stay synchronous (script reload calls it so); the sockets close on the loop.
        with contextlib.suppress(RuntimeError):  # no loop left at interpreter exit
            asyncio.get_running_loop().create_task(self.shared.upstream.close())


def build_failover(config: Config, modes: list[str]) -> Failover:
    primary = config.target_proxy.url or reverse_target(modes)
    if primary is None:
        raise exceptions.OptionsError(
            "seaking-proxy needs an upstream: run mitmproxy with --mode reverse:<url>, or set target_proxy.url"
        )
    breaker = config.circuit_breaker
    sections = [(primary, config.target_proxy.api_key, config.target_proxy.weight)]
    sections += [(t.url, t.api_key, t.weight) for t in config.targets]
    targets = [
        Target(url, api_key, weight, CircuitBreaker(breaker.failure_threshold, breaker.open_seconds))
        for url, api_key, weight in sections
    ]
    budget = RetryBudget(config.retry_budget.percent, config.retry_budget.min_per_second)
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
