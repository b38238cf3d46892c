"""config.py alone: the schema, the twin keys, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retry_policy import RetryPolicy
from seaking.config import ConfigError, load_config, parse_config

SPEC_EXAMPLE = """
target_proxy:
  url: "https://target-proxy.example.com"
  timeout: 30
  max_retries: 3
  retry_delay: 1
  retry_backoff: 2

error_handling:
  retry_codes: [429, 502, 503, 504]
  fail_codes: [400, 401, 403]
  max_retries: 3
  base_delay: 1
  max_delay: 60
"""


def test_the_shipped_config_yaml_is_valid_and_is_the_defaults():
    shipped = load_config(Path(__file__).parent.parent / "config.yaml", environ={})
    assert shipped == parse_config({}, environ={})


def test_the_retry_defaults_live_in_the_policy_alone():
    """config.py takes them from RetryPolicy; config.yaml repeats them (the test above)."""
    assert parse_config({}, environ={}).retry == RetryPolicy()


def test_the_product_spec_example_is_accepted_as_written():
    config = parse_config(yaml.safe_load(SPEC_EXAMPLE), environ={})
    policy = config.retry
    assert (policy.max_retries, policy.base_delay, policy.backoff, policy.max_delay) == (3, 1, 2, 60)
    assert policy.retry_codes == {429, 502, 503, 504}
    assert config.target_proxy.url == "https://target-proxy.example.com"


def test_defaults():
    policy = parse_config({}, environ={}).retry
    assert (policy.max_retries, policy.base_delay, policy.deadline, policy.per_try_timeout) == (3, 1, 300, 30)
    assert policy.max_attempts == 4


@pytest.mark.parametrize(
    ("target_proxy", "error_handling", "max_retries", "base_delay"),
    [
        ({"max_retries": 5}, {}, 5, 1),
        ({}, {"max_retries": 5}, 5, 1),
        ({"retry_delay": 0.5}, {}, 3, 0.5),
        ({}, {"base_delay": 0.5}, 3, 0.5),
        ({"max_retries": 2, "retry_delay": 2}, {"max_retries": 2, "base_delay": 2}, 2, 2),
    ],
)
def test_twin_keys_are_one_setting(target_proxy, error_handling, max_retries, base_delay):
    policy = parse_config({"target_proxy": target_proxy, "error_handling": error_handling}, environ={}).retry
    assert (policy.max_retries, policy.base_delay) == (max_retries, base_delay)


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        ({"target_proxy": {"max_retries": 5}, "error_handling": {"max_retries": 2}}, "target_proxy.max_retries", "disagree"),
        ({"target_proxy": {"retry_delay": 1}, "error_handling": {"base_delay": 3}}, "error_handling.base_delay", "disagree"),
        ({"target_proxy": {"timeout": "30s"}}, "target_proxy.timeout", "must be a number"),
        ({"target_proxy": {"timeout": True}}, "target_proxy.timeout", "must be a number"),
        ({"target_proxy": {"timeout": 0}}, "target_proxy.timeout", "at least"),
        ({"target_proxy": {"timeout": float("inf")}}, "target_proxy.timeout", "finite"),
        ({"target_proxy": {"retry_backoff": 0.5}}, "target_proxy.retry_backoff", "at least 1"),
        ({"target_proxy": {"url": "ftp://x"}}, "target_proxy.url", "http:// or https://"),
        ({"target_proxy": {"url": "https://h/v1?x=1"}}, "target_proxy.url", "query"),
        ({"target_proxy": {"url": 5}}, "target_proxy.url", "must be a string"),
        ({"target_proxy": {"api_key": "  "}}, "target_proxy.api_key", "non-empty"),
        ({"target_proxy": {"max_retries": 1.5}}, "target_proxy.max_retries", "whole number"),
        ({"error_handling": {"base_delay": -1}}, "error_handling.base_delay", "at least 0"),
        ({"error_handling": {"max_retries": -1}}, "error_handling.max_retries", "at least 0"),
        ({"error_handling": {"max_delay": -5}}, "error_handling.max_delay", "at least 0"),
        ({"error_handling": {"base_delay": 10, "max_delay": 5}}, "error_handling.base_delay", "larger than"),
        ({"error_handling": {"retry_codes": [429, 401]}}, "error_handling.retry_codes", "[401]"),
        ({"error_handling": {"retry_codes": 503}}, "error_handling.retry_codes", "must be a list of whole numbers"),
        ({"error_handling": {"retry_codes": ["503"]}}, "error_handling.retry_codes[0]", "whole number"),
        ({"error_handling": {"fail_codes": [99]}}, "error_handling.fail_codes", "not an HTTP status"),
        ({"error_handling": {"deadline": None}}, "error_handling.deadline", "must not be empty"),
        ({"error_handling": {"max_retry": 3}}, "error_handling.max_retry", "unknown key"),
        ({"server": {"access_key": "k"}}, "server.access_key", "target_proxy.api_key"),
        ({"server": {"max_body_bytes": 0}}, "server.max_body_bytes", "at least 1"),
        ({"models": {"fallback": "gpt-4o"}}, "models.fallback", "must be a list of strings"),
        ({"targets": [{"api_key": "k"}]}, "targets[0].url", "must be set"),
        ({"targets": [{"url": "ftp://b"}]}, "targets[0].url", "http://"),
        ({"targets": [{"url": "https://b", "weight": -1}]}, "targets[0].weight", "at least 0"),
        ({"targets": [{"url": "https://b", "key": "k"}]}, "targets[0].key", "unknown key"),
        ({"targets": {"url": "https://b"}}, "targets", "must be a list of mappings"),
        ({"targets": [{"url": "https://b", "api_key": "${SEAKING_TEST_UNSET_VAR}"}]}, "targets[0].api_key", "SEAKING_TEST_UNSET_VAR is not set"),
        ({"load_balancing": "random"}, "load_balancing", "priority, round_robin, weighted"),
        ({"model_fallbacks": ["a"]}, "model_fallbacks", "must be a mapping"),
        ({"model_fallbacks": {"a": "b"}}, "model_fallbacks.a", "must be a list of strings"),
        ({"model_fallbacks": {"a": ["b", "a"]}}, "model_fallbacks.a", "its own fallback"),
        ({"circuit_breaker": {"failure_threshold": 0}}, "circuit_breaker.failure_threshold", "at least 1"),
        ({"health_check": {"interval": -1}}, "health_check.interval", "at least 0"),
        ({"retry_budget": {"percent": "20%"}}, "retry_budget.percent", "must be a number"),
        ({"modles": {}}, "modles", "unknown key"),
        ({"target_proxy": ["url"]}, "target_proxy", "must be a mapping"),
        (["target_proxy"], "config", "must be a mapping"),
    ],
)
def test_bad_values_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as error:
        parse_config(raw, environ={})
    assert str(error.value).startswith(key) or key in str(error.value)
    assert words in str(error.value)


def test_environment_overrides_the_keys():
    raw = {"target_proxy": {"api_key": "from-file"}, "server": {"access_key": "file-access"}}
    config = parse_config(raw, environ={"SEAKING_API_KEY": "from-env", "SEAKING_ACCESS_KEY": "env-access"})
    assert (config.target_proxy.api_key, config.server.access_key) == ("from-env", "env-access")
    assert parse_config(raw, environ={"SEAKING_API_KEY": ""}).target_proxy.api_key == "from-file"


def test_environment_alone_can_set_both_keys():
    config = parse_config({}, environ={"SEAKING_API_KEY": "k1", "SEAKING_ACCESS_KEY": "k2"})
    assert (config.target_proxy.api_key, config.server.access_key) == ("k1", "k2")


def test_files(tmp_path):
    json_file = tmp_path / "c.json"
    json_file.write_text('{"error_handling": {"max_retries": 7}}')
    assert load_config(json_file, environ={}).retry.max_retries == 7
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, environ={}) == parse_config({}, environ={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("target_proxy: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_models_cache_path(tmp_path, monkeypatch):
    assert parse_config({"models": {"cache_file": str(tmp_path / "m.json")}}, environ={}).models_cache_path == tmp_path / "m.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert parse_config({}, environ={}).models_cache_path == tmp_path / "seaking-proxy" / "models.json"


def test_failover_sections():
    raw = {
        "targets": [{"url": "https://b.example/v1", "api_key": "${BACKUP_KEY}", "weight": 3}, {"url": "http://c"}],
        "load_balancing": "weighted",
        "model_fallbacks": {"gpt-4.1-mini": ["gpt-4o-mini", "gpt-4o"]},
    }
    config = parse_config(raw, environ={"BACKUP_KEY": "sk-backup"})
    assert [(t.url, t.api_key, t.weight) for t in config.targets] == [("https://b.example/v1", "sk-backup", 3), ("http://c", None, 1)]
    assert config.load_balancing == "weighted"
    assert config.model_fallbacks == {"gpt-4.1-mini": ("gpt-4o-mini", "gpt-4o")}
    assert (config.circuit_breaker.failure_threshold, config.health_check.interval, config.retry_budget.percent) == (5, 30, 20)


def test_environment_references_work_in_any_string():
    config = parse_config({"target_proxy": {"url": "https://${HOST}/v1", "api_key": "${KEY}"}}, environ={"HOST": "h", "KEY": "k1"})
    assert (config.target_proxy.url, config.target_proxy.api_key) == ("https://h/v1", "k1")
