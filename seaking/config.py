"""config.yaml: schema, validation and the resolved settings the addon runs on.

Each YAML section is a frozen dataclass; its fields are the section's keys, their annotations the accepted types and
their metadata the allowed ranges. `load_config` checks a file against that schema and raises `ConfigError` naming the
offending key, so a typo stops start-up instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from retry_policy import RetryPolicy
from seaking.outbound import proxy_problem

# The retry defaults live in one place, the policy itself; config.yaml repeats them (tests/test_config.py checks it).
DEFAULT_POLICY = RetryPolicy()
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"  # beside addon.py
ENV_API_KEY = "SEAKING_API_KEY"
ENV_ACCESS_KEY = "SEAKING_ACCESS_KEY"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and what is wrong with it."""


PrefillSetting = typing.Literal["auto", "assistant", "prefix", "none"]


def _at_least(low: float) -> dict:
    return {"low": low}


@dataclass(frozen=True)
class TargetProxySection:
    url: str | None = None
    api_key: str | None = None
    timeout: float = field(default=DEFAULT_POLICY.per_try_timeout, metadata=_at_least(0.001))
    # max_retries and retry_delay are the same settings as error_handling.max_retries and error_handling.base_delay:
    # the product spec names them twice. Either spelling may be used; if both are given they must agree.
    max_retries: int | None = field(default=None, metadata=_at_least(0))
    retry_delay: float | None = field(default=None, metadata=_at_least(0))
    retry_backoff: float = field(default=DEFAULT_POLICY.backoff, metadata=_at_least(1))
    weight: float = field(default=1, metadata=_at_least(0))  # with load_balancing: weighted
    proxy: str | None = None  # http://, https://, socks5:// or socks5h:// proxy; else HTTPS_PROXY etc. (outbound.py)
    prefill: PrefillSetting = "auto"  # how it continues a reply that broke off (resume.py)


@dataclass(frozen=True)
class ErrorHandlingSection:
    retry_codes: tuple[int, ...] = tuple(sorted(DEFAULT_POLICY.retry_codes))
    fail_codes: tuple[int, ...] = tuple(sorted(DEFAULT_POLICY.fail_codes))
    max_retries: int | None = field(default=None, metadata=_at_least(0))
    base_delay: float | None = field(default=None, metadata=_at_least(0))
    max_delay: float = field(default=DEFAULT_POLICY.max_delay, metadata=_at_least(0))
    deadline: float = field(default=DEFAULT_POLICY.deadline, metadata=_at_least(0.001))
    retry_empty: bool = DEFAULT_POLICY.retry_empty  # a reply with no content at all is retried like a 503
    hedge_on_timeout: bool = DEFAULT_POLICY.hedge_on_timeout  # past its per-try timeout, an attempt keeps running


@dataclass(frozen=True)
class ServerSection:
    access_key: str | None = None
    max_body_bytes: int = field(default=32 * 1024 * 1024, metadata=_at_least(1))
    shutdown_grace: float = field(default=30, metadata=_at_least(0))  # seconds requests in flight may finish


@dataclass(frozen=True)
class ModelsSection:
    fallback: tuple[str, ...] = ()
    cache_file: str | None = None  # default: $XDG_CACHE_HOME/seaking-proxy/models.json


@dataclass(frozen=True)
class StreamingSection:
    # Response headers -> first content. With hedging a slow stream is never thrown away, so a stuck one may be given
    # company sooner (docs/streaming.md, benchmarks/fault_mix.py).
    first_event_timeout: float = field(default=30, metadata=_at_least(0.001))
    # The longest silence once streaming. A stream that stalls is continued where it broke (resume), so a stall need
    # not cost a minute; healthy streams send something far more often (docs/streaming.md, benchmarks/fault_mix.py).
    idle_timeout: float = field(default=15, metadata=_at_least(0.001))
    heartbeat_interval: float = field(default=15, metadata=_at_least(0.001))  # SSE comments while the client waits
    resume: bool = True  # a reply that broke off mid-stream is continued (resume.py)
    resume_attempts: int = field(default=2, metadata=_at_least(0))  # continuations per request, at most


@dataclass(frozen=True)
class TargetSection:
    """A further upstream, tried after target_proxy's when that one fails (or shares the load with it)."""

    url: str
    api_key: str | None = None
    weight: float = field(default=1, metadata=_at_least(0))
    proxy: str | None = None
    prefill: PrefillSetting = "auto"


@dataclass(frozen=True)
class CircuitBreakerSection:
    failure_threshold: int = field(default=5, metadata=_at_least(1))  # consecutive failures that open a breaker
    open_seconds: float = field(default=30, metadata=_at_least(0))  # then one probe request is let through


@dataclass(frozen=True)
class HealthCheckSection:
    interval: float = field(default=30, metadata=_at_least(0))  # seconds between probes; 0 turns them off


@dataclass(frozen=True)
class RetryBudgetSection:
    percent: float = field(default=20, metadata=_at_least(0))  # retries may add this share of requests ...
    min_per_second: float = field(default=3, metadata=_at_least(0))  # ... but always at least this many per second


@dataclass(frozen=True)
class Config:
    target_proxy: TargetProxySection = TargetProxySection()
    error_handling: ErrorHandlingSection = ErrorHandlingSection()
    server: ServerSection = ServerSection()
    models: ModelsSection = ModelsSection()
    streaming: StreamingSection = StreamingSection()
    targets: tuple[TargetSection, ...] = ()
    load_balancing: typing.Literal["priority", "round_robin", "weighted"] = "priority"
    model_fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    circuit_breaker: CircuitBreakerSection = CircuitBreakerSection()
    health_check: HealthCheckSection = HealthCheckSection()
    retry_budget: RetryBudgetSection = RetryBudgetSection()

    @functools.cached_property  # read by every request; a config never changes (a reload makes a new one)
    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            retry_codes=frozenset(self.error_handling.retry_codes),
            fail_codes=frozenset(self.error_handling.fail_codes),
            max_retries=self.error_handling.max_retries,
            base_delay=self.error_handling.base_delay,
            backoff=self.target_proxy.retry_backoff,
            max_delay=self.error_handling.max_delay,
            deadline=self.error_handling.deadline,
            per_try_timeout=self.target_proxy.timeout,
            retry_empty=self.error_handling.retry_empty,
            hedge_on_timeout=self.error_handling.hedge_on_timeout,
        )

    @property
    def models_cache_path(self) -> Path:
        if self.models.cache_file:
            return Path(self.models.cache_file).expanduser()
        cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(cache_home) / "seaking-proxy" / "models.json"


# Defaults for the settings the spec spells twice; applied after the two spellings are reconciled.
_TWIN_KEYS = {
    # (target_proxy key, error_handling key): default
    ("max_retries", "max_retries"): DEFAULT_POLICY.max_retries,
    ("retry_delay", "base_delay"): DEFAULT_POLICY.base_delay,
}


def load_config(path: str | os.PathLike, environ: Mapping[str, str] = os.environ) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"seaking_config: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"seaking_config: {path} is not UTF-8 text: {e}") from None
    try:
        raw = yaml.safe_load(text)
    # ValueError: an integer of more than 4300 digits (Python's limit); RecursionError: nesting deeper than the parser goes
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(f"seaking_config: {path} is not valid YAML: {e}") from None
    return parse_config(raw if raw is not None else {}, environ)


def parse_config(raw: object, environ: Mapping[str, str] = os.environ) -> Config:
    """Validate a parsed YAML document; environment variables override the keys."""
    config = _build(Config, raw, "", environ)
    # Messages name the spelling of the base delay the document used.
    given_alone = config.error_handling.base_delay is None and config.target_proxy.retry_delay is not None
    delay_key = "target_proxy.retry_delay" if given_alone else "error_handling.base_delay"
    config = _reconcile_twin_keys(config)
    config = _apply_environment(config, environ)
    _check_relations(config, delay_key)
    return config


def _build(cls: type, data: object, prefix: str, environ: Mapping[str, str]):
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: must be a mapping of keys, got {_type_name(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (known keys here: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            values[name] = _convert(key, hints[name], data[name], f.metadata, environ)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: must be set")
    return cls(**values)


def _convert(key: str, hint, value, limits: Mapping, environ: Mapping[str, str]):
    """Check `value` against the type `hint` (and limits); returns it in the dataclass's form."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", environ)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        return None if value is None else _convert(key, next(a for a in args if a is not type(None)), value, limits, environ)
    if value is None:
        raise ConfigError(f"{key}: must not be empty")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list of {_describe(args[0])}, got {_type_name(value)}")
        return tuple(_convert(f"{key}[{i}]", args[0], item, limits, environ) for i, item in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be a mapping, got {_type_name(value)}")
        return {str(k): _convert(f"{key}.{k}", args[1], v, limits, environ) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    return _check_scalar(key, hint, value, limits, environ)


def _check_scalar(key: str, expected: type, value, limits: Mapping, environ: Mapping[str, str]):
    # bool is an int in Python, but `timeout: true` is a mistake, not 1 second.
    if isinstance(value, bool) is not (expected is bool) or not isinstance(value, _ACCEPTED[expected]):
        raise ConfigError(f"{key}: must be {_DESCRIBED[expected]}, got {_type_name(value)} {value!r}")
    if expected is str:
        return _expand_environment(key, value, environ)
    if expected is float and not _finite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    low = limits.get("low")
    if low is not None and value < low:
        raise ConfigError(f"{key}: must be at least {low:g}, got {value!r}")
    return value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int larger than any float
        return False


def _expand_environment(key: str, value: str, environ: Mapping[str, str]) -> str:
    """`${VAR}` in any string is read from the environment, so keys need not be written into the file."""

    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"{key}: environment variable {name} is not set")
        return environ[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lookup, value)


_ACCEPTED = {int: int, float: (int, float), str: str, bool: bool}
_DESCRIBED = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _describe(hint) -> str:
    return {int: "whole numbers", float: "numbers", str: "strings"}.get(hint, "mappings")


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _reconcile_twin_keys(config: Config) -> Config:
    target, handling = config.target_proxy, config.error_handling
    for (target_key, handling_key), default in _TWIN_KEYS.items():
        a, b = getattr(target, target_key), getattr(handling, handling_key)
        if a is not None and b is not None and a != b:
            raise ConfigError(
                f"target_proxy.{target_key} ({a!r}) and error_handling.{handling_key} ({b!r}) are the same setting "
                f"and disagree: set one of them, or both to the same value"
            )
        value = a if a is not None else b if b is not None else default
        target = dataclasses.replace(target, **{target_key: value})
        handling = dataclasses.replace(handling, **{handling_key: value})
    return dataclasses.replace(config, target_proxy=target, error_handling=handling)


def _apply_environment(config: Config, environ: Mapping[str, str]) -> Config:
    if environ.get(ENV_API_KEY):
        config = dataclasses.replace(
            config, target_proxy=dataclasses.replace(config.target_proxy, api_key=environ[ENV_API_KEY])
        )
    if environ.get(ENV_ACCESS_KEY):
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, access_key=environ[ENV_ACCESS_KEY])
        )
    return config


def _check_relations(config: Config, delay_key: str = "error_handling.base_delay") -> None:
    urls = [("target_proxy.url", config.target_proxy.url)] + [(f"targets[{i}].url", t.url) for i, t in enumerate(config.targets)]
    for key, url in urls:
        if url is None:
            continue
        try:
            parts = urlsplit(url)
        except ValueError:  # "[" without "]", a host that NFKC normalization turns into a delimiter
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{key}: must be an http:// or https:// URL with a host, got {url!r}")
        try:
            parts.port  # noqa: B018 (targets.py reads it: ValueError for one that is not a number from 0 to 65535)
        except ValueError:
            raise ConfigError(f"{key}: has an invalid port, got {url!r}") from None
        if parts.query or parts.fragment:
            raise ConfigError(f"{key}: must not have a query or fragment, got {url!r}")
    proxies = [("target_proxy.proxy", config.target_proxy.proxy)] + [(f"targets[{i}].proxy", t.proxy) for i, t in enumerate(config.targets)]
    for key, proxy in proxies:
        try:
            problem = proxy_problem(proxy) if proxy is not None else None
        except ValueError:  # urlsplit's ("[" without "]", ...); not repeating the URL, which may hold a password
            problem = "is not a URL that can be parsed"
        if problem:
            raise ConfigError(f"{key}: {problem}")
    for model, fallbacks in config.model_fallbacks.items():
        if model in fallbacks:
            raise ConfigError(f"model_fallbacks.{model}: a model cannot be its own fallback")
    handling = config.error_handling
    for key in ("retry_codes", "fail_codes"):
        for code in getattr(handling, key):
            if not 100 <= code <= 599:
                raise ConfigError(f"error_handling.{key}: {code} is not an HTTP status code (100-599)")
    both = sorted(set(handling.retry_codes) & set(handling.fail_codes))
    if both:
        raise ConfigError(
            f"error_handling.retry_codes and error_handling.fail_codes: {both} cannot be both retried and failed fast"
        )
    if handling.base_delay > handling.max_delay:
        raise ConfigError(
            f"{delay_key} ({handling.base_delay:g}) is larger than error_handling.max_delay "
            f"({handling.max_delay:g})"
        )
    secrets = [("target_proxy.api_key", config.target_proxy.api_key), ("server.access_key", config.server.access_key)]
    secrets += [(f"targets[{i}].api_key", t.api_key) for i, t in enumerate(config.targets)]
    for key, secret in secrets:
        if secret is not None and (not secret.strip() or any(c in secret for c in "\r\n")):
            raise ConfigError(f"{key}: must be a non-empty single-line string")
    if config.server.access_key and not config.target_proxy.api_key:
        raise ConfigError(
            "server.access_key: needs target_proxy.api_key as well: clients then send the access key, "
            "so the proxy must hold the upstream key itself"
        )
