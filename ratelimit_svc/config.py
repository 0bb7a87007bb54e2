"""ratelimit_svc settings, read once from TOKENS_* variables."""
import dataclasses
import urllib.parse

from common import config
from ratelimit_svc import limits

_SCHEMES = ("redis", "rediss")


@dataclasses.dataclass(frozen=True)
class Settings:
    server: config.ServerSettings
    # redis:// or rediss://; with redis_cluster, any node of the cluster.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    # Bound on every Redis call; past it the call fails and the service degrades to memory.
    redis_timeout_ms: int = 50
    # While degraded, how often Redis is tried again in the background.
    redis_probe_s: float = 1.0
    redis_connections_max: int = 64
    # Keys the per-replica fallback window remembers (least recently used forgotten first).
    memory_keys_max: int = 100_000
    public_base_url: str = "https://tokens.flex.ai"
    # limits.ClientLimit name -> its count (0: off); absent names keep the table's default.
    client_limits: dict[str, int] = dataclasses.field(default_factory=dict)

    def client_limit(self, limit: limits.ClientLimit) -> int:
        return self.client_limits.get(limit.name, limit.limit)

    @classmethod
    def from_env(cls) -> "Settings":
        redis_url = config.env_str("TOKENS_REDIS_URL", cls.redis_url)
        if urllib.parse.urlsplit(redis_url).scheme not in _SCHEMES:
            raise config.ConfigError("TOKENS_REDIS_URL", f"expected redis:// or rediss://, got {redis_url!r}")
        base_url = config.env_str("TOKENS_PUBLIC_BASE_URL", cls.public_base_url).rstrip("/")
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise config.ConfigError("TOKENS_PUBLIC_BASE_URL", f"expected an http(s) URL, got {base_url!r}")
        return cls(
            server=config.ServerSettings.from_env(default_port=50052),
            redis_url=redis_url,
            redis_cluster=config.env_bool("TOKENS_REDIS_CLUSTER", cls.redis_cluster),
            redis_timeout_ms=config.env_int("TOKENS_REDIS_TIMEOUT_MS", cls.redis_timeout_ms,
                                            minimum=1, maximum=10_000),
            redis_probe_s=config.env_float("TOKENS_REDIS_PROBE_S", cls.redis_probe_s, minimum=0.01),
            redis_connections_max=config.env_int("TOKENS_REDIS_CONNECTIONS_MAX", cls.redis_connections_max,
                                                 minimum=1, maximum=10_000),
            memory_keys_max=config.env_int("TOKENS_RATELIMIT_MEMORY_KEYS_MAX", cls.memory_keys_max,
                                           minimum=1, maximum=10_000_000),
            public_base_url=base_url,
            client_limits={limit.name: config.env_int(limit.setting, limit.limit, minimum=0, maximum=1_000_000)
                           for limit in limits.LIMITS},
        )
