"""auth_svc settings, read once from TOKENS_* variables."""
import dataclasses

from common import config

PLUS_TAGS = ("same", "distinct")


@dataclasses.dataclass(frozen=True)
class Settings:
    server: config.ServerSettings
    database_url: str
    database_schema: str
    # ledger_svc, which opens the credit account on signup and tells balances.
    ledger_addr: str
    ledger_timeout_s: float = 3.0
    # ratelimit_svc, which keeps the limits on signups, failed logins and verification mails.
    ratelimit_addr: str = "127.0.0.1:50052"
    ratelimit_timeout_s: float = 1.0
    session_ttl_s: int = 7 * 24 * 3600
    min_password_chars: int = 10
    # argon2id cost: the library's defaults (RFC 9106 low-memory profile).
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    # Password hashes computed at once (each in a process of its own, at the lowest CPU
    # priority), how many more may wait, and how long; beyond that a login or signup is a 503.
    argon2_workers: int = 1
    argon2_queue_max: int = 16
    argon2_wait_max_s: float = 5.0
    # "same": alice+news@example.com is alice@example.com's account (one inbox, one free
    # credit); "distinct": they are two accounts. Case never makes two accounts.
    email_plus_tags: str = "same"
    # A verification link works this long.
    verify_ttl_s: int = 3 * 86400
    # Where the verification link points: <base>/dashboard/verify#<token>.
    public_base_url: str = config.PUBLIC_BASE_URL_DEFAULT
    # Pending signups (ledger unreachable at the time) are finished this often.
    reconcile_every_s: float = 30.0
    # Admitted keys are cached this long at most (changes clear it at once; 0: off).
    key_cache_ttl_s: float = 30.0

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            server=config.ServerSettings.from_env(default_port=50051),
            database_url=config.database_url("auth"),
            database_schema=config.env_str("TOKENS_DATABASE_SCHEMA", ""),
            ledger_addr=config.env_str("TOKENS_LEDGER_ADDR", "127.0.0.1:50053"),
            ledger_timeout_s=config.env_float("TOKENS_LEDGER_TIMEOUT_S", 3.0, minimum=0.1),
            ratelimit_addr=config.env_str("TOKENS_RATELIMIT_ADDR", "127.0.0.1:50052"),
            ratelimit_timeout_s=config.env_float("TOKENS_RATELIMIT_TIMEOUT_S", 1.0, minimum=0.05),
            session_ttl_s=config.env_int("TOKENS_SESSION_TTL_S", 7 * 24 * 3600, minimum=60),
            argon2_time_cost=config.env_int("TOKENS_ARGON2_TIME_COST", 3, minimum=1),
            argon2_memory_kib=config.env_int("TOKENS_ARGON2_MEMORY_KIB", 65536, minimum=8),
            argon2_workers=config.env_int("TOKENS_ARGON2_WORKERS", 1, minimum=1, maximum=64),
            argon2_queue_max=config.env_int("TOKENS_ARGON2_QUEUE_MAX", 16, minimum=0, maximum=10_000),
            argon2_wait_max_s=config.env_float("TOKENS_ARGON2_WAIT_MAX_S", 5.0, minimum=0.1),
            email_plus_tags=_plus_tags(),
            verify_ttl_s=config.env_int("TOKENS_VERIFY_TTL_S", 3 * 86400, minimum=60),
            public_base_url=config.public_base_url(),
            key_cache_ttl_s=config.env_float("TOKENS_KEY_CACHE_TTL_S", 30.0, minimum=0),
        )


def _plus_tags() -> str:
    value = config.env_str("TOKENS_EMAIL_PLUS_TAGS", "same").strip().lower()
    if value not in PLUS_TAGS:
        raise config.ConfigError("TOKENS_EMAIL_PLUS_TAGS", f"expected same or distinct, got {value!r}")
    return value
