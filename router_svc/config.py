"""router_svc settings, read once from TOKENS_* variables."""
import dataclasses
import pathlib

from common import catalog, config


@dataclasses.dataclass(frozen=True)
class Settings:
    server: config.ServerSettings
    database_url: str
    database_schema: str
    catalog_path: pathlib.Path
    ledger_addr: str
    ledger_timeout_s: float = 3.0
    # Backends: connecting is quick or it is down; a model may think for a while
    # between tokens; a whole non-streamed answer has an outer bound.
    backend_connect_timeout_s: float = 3.0
    backend_idle_timeout_s: float = 120.0
    backend_total_timeout_s: float = 600.0
    backend_max_connections: int = 512
    # A backend that refused a connection is skipped for this long.
    backend_down_s: float = 2.0
    # Settlements go to ledger_svc in batches; what it cannot take waits in the outbox.
    settle_batch_max: int = 500
    settle_linger_s: float = 0.002
    settle_queue_max: int = 50_000
    outbox_retry_s: float = 1.0
    prices_ttl_s: float = 5.0
    # Benchmarks of the ledger hop only: run calls that no hold covers. Never
    # set in production: every such call is free.
    allow_unheld_for_benchmarks: bool = False

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            server=config.ServerSettings.from_env(default_port=50054),
            database_url=config.database_url("router"),
            database_schema=config.env_str("TOKENS_DATABASE_SCHEMA", ""),
            catalog_path=catalog.default_path(),
            ledger_addr=config.env_str("TOKENS_LEDGER_ADDR", "127.0.0.1:50053"),
            ledger_timeout_s=config.env_float("TOKENS_LEDGER_TIMEOUT_S", 3.0, minimum=0.1),
            backend_connect_timeout_s=config.env_float("TOKENS_BACKEND_CONNECT_TIMEOUT_S", 3.0, minimum=0.1),
            backend_idle_timeout_s=config.env_float("TOKENS_BACKEND_IDLE_TIMEOUT_S", 120.0, minimum=1),
            backend_total_timeout_s=config.env_float("TOKENS_BACKEND_TOTAL_TIMEOUT_S", 600.0, minimum=1),
            backend_max_connections=config.env_int("TOKENS_BACKEND_MAX_CONNECTIONS", 512, minimum=1),
            allow_unheld_for_benchmarks=config.env_bool("TOKENS_ALLOW_UNHELD_CALLS_FOR_BENCHMARKS", False),
        )
