"""ratelimit_svc settings: defaults, and bad values stopping start-up."""
import pytest

from common import config as common_config
from ratelimit_svc import config

_VARS = ("TOKENS_REDIS_URL", "TOKENS_REDIS_CLUSTER", "TOKENS_REDIS_TIMEOUT_MS", "TOKENS_REDIS_PROBE_S",
         "TOKENS_PUBLIC_BASE_URL", "TOKENS_GRPC_PORT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    settings = config.Settings.from_env()
    assert settings.server.port == 50052
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert not settings.redis_cluster
    assert (settings.redis_timeout_ms, settings.redis_probe_s) == (50, 1.0)
    assert settings.public_base_url == "https://tokens.flex.ai"


def test_values_from_the_environment(monkeypatch):
    monkeypatch.setenv("TOKENS_REDIS_URL", "rediss://cache.internal:6380/2")
    monkeypatch.setenv("TOKENS_REDIS_CLUSTER", "true")
    monkeypatch.setenv("TOKENS_REDIS_TIMEOUT_MS", "20")
    monkeypatch.setenv("TOKENS_REDIS_PROBE_S", "0.5")
    monkeypatch.setenv("TOKENS_PUBLIC_BASE_URL", "https://example.test/")
    settings = config.Settings.from_env()
    assert settings.redis_url == "rediss://cache.internal:6380/2"
    assert settings.redis_cluster
    assert (settings.redis_timeout_ms, settings.redis_probe_s) == (20, 0.5)
    assert settings.public_base_url == "https://example.test"


@pytest.mark.parametrize("name, value", [
    ("TOKENS_REDIS_URL", "http://127.0.0.1:6379"),
    ("TOKENS_REDIS_URL", "127.0.0.1:6379"),
    ("TOKENS_REDIS_TIMEOUT_MS", "0"),
    ("TOKENS_REDIS_TIMEOUT_MS", "fast"),
    ("TOKENS_REDIS_PROBE_S", "0"),
    ("TOKENS_REDIS_CLUSTER", "maybe"),
    ("TOKENS_PUBLIC_BASE_URL", "tokens.flex.ai"),
])
def test_bad_values_stop_start_up(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(common_config.ConfigError, match=name):
        config.Settings.from_env()
