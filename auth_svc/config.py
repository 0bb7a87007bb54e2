"""auth_svc settings, read once from TOKENS_* variables."""
import dataclasses

from common import config


@dataclasses.dataclass(frozen=True)
class Settings:
    server: config.ServerSettings
    database_url: str
    database_schema: str
    # ledger_svc, which opens the credit account on signup and tells balances.
    ledger_addr: str
    ledger_timeout_s: float = 3.0
    session_ttl_s: int = 7 * 24 * 3600
    min_password_chars: int = 10
    max_keys_per_account: int = 50
    # argon2id cost: the library's defaults (RFC 9106 low-memory profile).
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
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
            session_ttl_s=config.env_int("TOKENS_SESSION_TTL_S", 7 * 24 * 3600, minimum=60),
            argon2_time_cost=config.env_int("TOKENS_ARGON2_TIME_COST", 3, minimum=1),
            argon2_memory_kib=config.env_int("TOKENS_ARGON2_MEMORY_KIB", 65536, minimum=8),
            key_cache_ttl_s=config.env_float("TOKENS_KEY_CACHE_TTL_S", 30.0, minimum=0),
        )
