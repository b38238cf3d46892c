"""Property tests for config.py: any YAML/JSON document is either a whole, valid Config or a ConfigError naming a key;
never another exception, never a partial config. Profiles (how many examples) are in conftest.py; the cases they found
are plain tests at the end."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import typing
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import event, given
from hypothesis import strategies as st

from retry_policy import RetryPolicy
from seaking.config import ENV_ACCESS_KEY, ENV_API_KEY, Config, ConfigError, load_config, parse_config

# Values of any type a YAML or JSON document can hold.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),  # larger than any float
    st.floats(),
    st.text(max_size=12),
    st.dates(),  # YAML's timestamps
    st.binary(max_size=8),  # YAML's !!binary
)
any_value = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=12,
)

# Strings the schema's string keys meet: URLs good and bad, secrets, ${VAR} references.
ENV_NAMES = ["HOME_X", "KEY", "UNSET", ENV_API_KEY, ENV_ACCESS_KEY]
url_pieces = st.sampled_from(
    ["http://", "https://", "socks5://", "socks5h://", "ftp://", "h", "host.example", "127.0.0.1", "[::1]", "[", "]",
     ":", ":8080", ":99999", ":x", "@", "user:pw@", "/", "/v1", "?q=1", "#f", "\uff03", "\u2100", " ", "\n", "%41"]
)
strings = st.one_of(
    st.text(max_size=16),
    st.lists(url_pieces, min_size=1, max_size=6).map("".join),
    st.lists(st.sampled_from([f"${{{n}}}" for n in ENV_NAMES] + ["$", "${", "}", "x", "${1}"]), max_size=4).map("".join),
)
numbers = st.one_of(
    st.integers(-3, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=10**300, max_value=10**400),  # larger than any float
    st.sampled_from([0, 0.0, 0.001, 1, 1.0, 2, 60, 100, 600, 599, -1, 1e308]),
)
status_codes = st.one_of(st.integers(0, 700), st.sampled_from([400, 401, 403, 429, 500, 502, 503, 504, 529]))


def urls(schemes: list[str]) -> st.SearchStrategy:
    """URLs put together from parts, mostly good ones: a host, maybe credentials, a port, a path."""
    return st.builds(
        lambda scheme, userinfo, host, port, path: f"{scheme}://{userinfo}{host}{port}{path}",
        st.sampled_from(schemes + ["ftp"]),
        st.sampled_from(["", "", "u:p@", "@", "u:p@@"]),
        st.sampled_from(["h", "api.example.com", "127.0.0.1", "[::1]", "", "[", "[::1", "::1]", "h\uff03x", "h\u2100x", "h x"]),
        st.sampled_from(["", "", ":8443", ":0", ":65535", ":65536", ":99999", ":x", ":-1", ":"]),
        st.sampled_from(["", "/", "/v1", "/api/v1/", "?q=1", "#f", "/a b"]),
    )


GOOD_STRINGS = {
    "url": urls(["http", "https"]),
    "proxy": urls(["http", "https", "socks5", "socks5h"]),
    "prefill": st.sampled_from(["auto", "assistant", "prefix", "none"]),
    "api_key": st.sampled_from(["sk-key", "${KEY}", " ", "a\nb"]),
    "access_key": st.sampled_from(["access", "${KEY}", ""]),
}
GOOD_CODES = {"retry_codes": [429, 500, 502, 503, 504, 529], "fail_codes": [400, 401, 403, 404, 422]}


def wild(hint) -> st.SearchStrategy:
    """Values of the type a key's annotation asks for, at and past its limits, or anything at all."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return section(hint)
    if type(None) in args:
        return st.none() | wild(next(a for a in args if a is not type(None)))
    if origin is tuple:
        return st.lists(status_codes if args[0] is int else wild(args[0]), max_size=4)
    if origin in (dict, Mapping):
        return st.dictionaries(strings, wild(args[1]), max_size=3)
    if origin is typing.Literal:
        return st.sampled_from(args) | strings
    typed = {bool: st.booleans(), int: numbers, float: numbers, str: strings}[hint]
    return st.one_of(typed, typed, any_value)


def good(name: str, hint, limits: Mapping) -> st.SearchStrategy:
    """Values a key accepts, mostly."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return section(hint)
    if type(None) in args:
        return st.none() | good(name, next(a for a in args if a is not type(None)), limits)
    if origin is tuple:
        item = st.sampled_from(GOOD_CODES.get(name, [0])) if args[0] is int else good(name, args[0], {})
        return st.lists(item, max_size=3, unique=args[0] is int)
    if origin in (dict, Mapping):
        return st.dictionaries(st.text(max_size=6), st.lists(st.text(max_size=6), max_size=2), max_size=2)
    if origin is typing.Literal:
        return st.sampled_from(args)
    low = limits.get("low") or 0
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(int(math.ceil(low)), int(low) + 10)
    if hint is float:
        high = 5 if name in ("base_delay", "retry_delay") else 1000  # below max_delay, mostly
        return st.integers(int(math.ceil(low)), high) | st.floats(low, high)
    return GOOD_STRINGS.get(name, st.text(max_size=12) | st.sampled_from(["sk-key", "${KEY}"]))


def section(cls) -> st.SearchStrategy:
    """A mapping for a schema section: some of its keys, each value mostly one it accepts (so that whole documents
    get past the first key often enough to test the later checks), now and then a wild one or an unknown key."""
    hints = typing.get_type_hints(cls)

    def value(f: dataclasses.Field) -> st.SearchStrategy:
        choice = good(f.name, hints[f.name], f.metadata), wild(hints[f.name])
        return st.integers(0, 15).flatmap(lambda n: choice[0] if n else choice[1])

    fields = {f.name: value(f) for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    known = st.fixed_dictionaries({k: fields[k] for k in required}, optional={k: v for k, v in fields.items() if k not in required})
    unknown = st.dictionaries(st.text(max_size=8) | st.integers() | st.none(), any_value, min_size=1, max_size=1)
    return st.integers(0, 15).flatmap(lambda n: known if n else st.builds(lambda a, b: {**b, **a}, known, unknown))


documents = st.one_of(section(Config), section(Config), section(Config), any_value)
environments = st.dictionaries(st.sampled_from(ENV_NAMES), st.sampled_from(["", " ", "k", "sk-1", "a\nb", "${KEY}"]) | st.text(max_size=6), max_size=4)


def key_paths(document, prefix: str = "", seen: frozenset = frozenset()) -> typing.Iterator[tuple[str, object]]:
    """Every key of a document and its value, spelt as config.py names them: target_proxy.url, targets[0].url."""
    if id(document) in seen:  # YAML anchors can make a document contain itself
        return
    seen = seen | {id(document)}
    items = document.items() if isinstance(document, Mapping) else enumerate(document) if isinstance(document, list) else ()
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(document, list) else f"{prefix}.{key}" if prefix else str(key)
        yield path, value
        yield from key_paths(value, path, seen)


SCHEMA_KEY = re.compile(r"(target_proxy|error_handling|server|models|streaming|targets\[\d+\]|circuit_breaker|health_check|retry_budget)\.\w+")
AFTER_A_KEY = (": ", " (", " and ")


def names_a_key(message: str, document, environ: Mapping[str, str]) -> bool:
    """The message starts with a key, and names one the document set (or the environment, or `config`: the document
    itself): the key followed by ": ", " (" or " and " (two keys that clash), at the start or after a space. A message
    may start with a key the document left at its default (error_handling.base_delay (1) is larger than
    error_handling.max_delay (0.5)) as long as it names the one that was set too."""
    paths = dict(key_paths(document))
    keys = set(paths) | {"config"}
    keys |= {p + ".url" for p, v in paths.items() if isinstance(v, Mapping)}  # targets[i].url: must be set
    if environ.get(ENV_API_KEY):
        keys.add("target_proxy.api_key")
    if environ.get(ENV_ACCESS_KEY):
        keys.add("server.access_key")
    if any(message.startswith(key) and message[len(key):].startswith(AFTER_A_KEY) for key in keys):
        return True
    return bool(SCHEMA_KEY.match(message)) and any(
        f" {key}{after}" in message for key in keys if "." in key for after in AFTER_A_KEY
    )


def conforms(value, hint, limits: Mapping = {}) -> bool:
    """Whether a parsed value has the type its annotation promises, within its key's limits."""
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return type(value) is hint and all(
            conforms(getattr(value, f.name), hints[f.name], f.metadata) for f in dataclasses.fields(hint)
        )
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if type(None) in args:
        return value is None or conforms(value, next(a for a in args if a is not type(None)), limits)
    if origin is tuple:
        return type(value) is tuple and all(conforms(item, args[0]) for item in value)
    if origin in (dict, Mapping):
        return type(value) is dict and all(type(k) is str and conforms(v, args[1]) for k, v in value.items())
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return type(value) is bool
    if hint is str:
        return type(value) is str
    if not (type(value) is int or (hint is float and type(value) is float and math.isfinite(value))):
        return False
    low, high = limits.get("low"), limits.get("high")
    return (low is None or value >= low) and (high is None or value <= high)


def assert_whole_and_valid(config: Config) -> None:
    assert conforms(config, Config)
    assert isinstance(config.retry, RetryPolicy)
    handling = config.error_handling
    assert handling.base_delay <= handling.max_delay
    assert not set(handling.retry_codes) & set(handling.fail_codes)
    assert all(100 <= code <= 599 for code in handling.retry_codes + handling.fail_codes)
    for url in [config.target_proxy.url] + [t.url for t in config.targets]:
        if url is not None:  # usable by targets.py and aiohttp: scheme, host and port can be read
            parts = urlsplit(url)
            assert parts.scheme in ("http", "https") and parts.hostname
            parts.port  # noqa: B018 (raises ValueError for a port that is not one)


def parse_or_error(raw, environ) -> Config | ConfigError:
    try:
        return parse_config(raw, environ)
    except ConfigError as e:
        return e


@given(raw=documents, environ=environments)
def test_any_document_is_a_whole_config_or_an_error_naming_a_key(raw, environ):
    result = parse_or_error(raw, environ)
    event("error" if isinstance(result, ConfigError) else "config")
    if isinstance(result, ConfigError):
        assert names_a_key(str(result), raw, environ), str(result)
    else:
        assert_whole_and_valid(result)


def _text(document, form: str) -> str:
    if form == "json":
        return json.dumps(document, default=str)
    return yaml.safe_dump(document, allow_unicode=True) if form == "yaml" else yaml.dump(document)


files = st.one_of(
    st.builds(_text, documents.filter(lambda d: not isinstance(d, bytes)), st.sampled_from(["json", "yaml", "yaml-tagged"])).map(str.encode),
    st.text(max_size=60).map(str.encode),
    st.lists(st.sampled_from(["target_proxy:", "\n", "  ", "url: ", "timeout: ", "&a ", "*a", "[", "]", "{", "}", "- ",
                              "!!python/object:os.system", "!!binary", "1e999", "0x10", "~", ": ", "'", '"', "\t", "\x00",
                              "\ufeff", "\xff"]), max_size=12).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass")),
    st.binary(max_size=40),
    # Past the parser's limits: an integer longer than Python converts (4300 digits); nesting, below.
    st.builds(lambda before, n: (before + "9" * n).encode(), st.sampled_from(["", "retry_budget: {percent: "]), st.integers(4000, 5000)),
)


def assert_loads_or_is_refused(content: bytes, environ: Mapping[str, str]) -> None:
    """load_config gives a whole, valid Config, or a ConfigError naming a key of the document, or naming the option
    (seaking_config) when the file cannot be read or is not YAML."""
    try:  # here, not after load_config: this call has more stack to nest into than load_config's own
        raw = yaml.safe_load(content.decode())
    except Exception:  # noqa: BLE001 (then load_config must say the file is not YAML)
        raw = None
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        path.write_bytes(content)
        try:
            config = load_config(path, environ)
        except ConfigError as e:
            if str(e).startswith("seaking_config: "):
                return
            assert names_a_key(str(e), raw if raw is not None else {}, environ), str(e)
        else:
            assert_whole_and_valid(config)


@given(content=files, environ=environments)
def test_any_file_loads_as_a_whole_config_or_an_error_naming_a_key(content, environ):
    assert_loads_or_is_refused(content, environ)


@given(
    before=st.sampled_from(["", "targets:\n", "target_proxy: ", "model_fallbacks:\n  m: "]),
    piece=st.sampled_from(["- ", "{a: ", "[", "- {a: "]),
    depth=st.integers(1, 1500),
)
def test_any_nesting_loads_or_is_refused_as_not_yaml(before, piece, depth):
    """Nesting up to and past what the YAML parser follows. (A long run of "[" is cut short: PyYAML's scanner takes
    seconds over 1500 of them, quadratically, before giving up.)"""
    content = (before + piece * (min(depth, 200) if "[" in piece else depth)).encode()
    assert_loads_or_is_refused(content, {})


@given(raw=section(Config))
def test_a_valid_config_written_back_loads_the_same(raw):
    """A config that loads is the same config when dumped as YAML and loaded again (nothing half-applied)."""
    result = parse_or_error(raw, {})
    if isinstance(result, ConfigError):
        return
    assert parse_config(yaml.safe_load(yaml.safe_dump(raw)), {}) == result


# Cases the properties found, written out.


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # An integer larger than any float on a number key: OverflowError from math.isfinite.
        ({"retry_budget": {"percent": 10**400}}, "retry_budget.percent: must be a finite number"),
        ({"target_proxy": {"timeout": -(10**400)}}, "target_proxy.timeout: must be a finite number"),
        # URLs urlsplit cannot parse: ValueError from config.py's check or from outbound.proxy_problem.
        ({"targets": [{"url": "http://["}]}, "targets[0].url: must be an http:// or https:// URL with a host"),
        ({"targets": [{"url": "http://h\uff03x"}]}, "targets[0].url: must be an http:// or https:// URL with a host"),
        ({"target_proxy": {"proxy": "http://["}}, "target_proxy.proxy: is not a URL that can be parsed"),
        ({"targets": [{"url": "http://h", "proxy": "socks5://u:secret@h\uff03x"}]}, "targets[0].proxy: is not a URL"),
        # A port that is not one was accepted, and raised later wherever targets.py reads it.
        ({"targets": [{"url": "http://h:x"}]}, "targets[0].url: has an invalid port"),
        ({"target_proxy": {"url": "http://h:65536"}}, "target_proxy.url: has an invalid port"),
        # The base delay given as target_proxy.retry_delay was blamed on error_handling.base_delay, not in the file.
        ({"target_proxy": {"retry_delay": 61.0}}, "target_proxy.retry_delay (61) is larger than error_handling.max_delay (60)"),
    ],
)
def test_found_documents_give_an_error_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as error:
        parse_config(raw, environ={})
    assert str(error.value).startswith(message)
    assert "secret" not in str(error.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80", "is not UTF-8 text"),  # UnicodeDecodeError from read_text
        (b"targets:\n" + b"- " * 2000, "is not valid YAML"),  # RecursionError from the YAML parser
        (b"retry_budget:\n  percent: " + b"9" * 5000, "is not valid YAML"),  # ValueError: over 4300 digits
    ],
)
def test_found_files_give_an_error_naming_the_option(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert str(error.value).startswith(f"seaking_config: {path} {message}")
