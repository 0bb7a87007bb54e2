"""Reading TOKENS_* environment variables: typed, with defaults, failing loudly."""
import dataclasses
import ipaddress
import os
import pathlib

from common import tls as tls_mod

# TOKENS_HOLD_TTL_S's default: ledger_svc lets a claimed hold lapse after it, and router_svc
# keeps a video job shorter than it (the job must end, and settle, before its hold lapses).
HOLD_TTL_S_DEFAULT = 900
# TOKENS_HOLD_CLAIM_S's default: a hold no router_svc has claimed lapses after it; router_svc
# ends a stream whose hold it could not claim before then (its ledger unreachable).
HOLD_CLAIM_S_DEFAULT = 60
# Where customers reach the API (the 402 message's billing link, image URLs), unless
# TOKENS_PUBLIC_BASE_URL says otherwise.
PUBLIC_BASE_URL_DEFAULT = "https://tokens.flex.ai"


class ConfigError(SystemExit):
    """A missing or malformed setting: stops start-up with a message naming it."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"configuration error: {name}: {problem}")


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"expected an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be <= {maximum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"expected true or false, got {raw!r}")


def data_dir() -> pathlib.Path:
    """TOKENS_DATA_DIR (default .data/ in the working directory), created if absent."""
    path = pathlib.Path(env_str("TOKENS_DATA_DIR", ".data")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url(service: str) -> str:
    """TOKENS_DATABASE_URL, or a SQLite file named after the service in the data dir."""
    url = env_str("TOKENS_DATABASE_URL", "")
    if url:
        return url
    return f"sqlite:///{data_dir() / (service + '.db')}"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """How a service listens and stops; the same variables for every service."""

    host: str
    port: int
    log_level: str
    # After SIGTERM: seconds reporting NOT_SERVING before refusing new calls,
    # then seconds calls in flight get to finish.
    drain_s: float
    grace_s: float
    # Prometheus /metrics on this port (0: none).
    metrics_port: int = 0
    # The mesh's certificates (TOKENS_TLS_DIR, role "service"): listen with mutual TLS and
    # present the certificate when calling other services. None: plaintext, for tests that
    # build one server on loopback.
    tls: tls_mod.Files | None = None

    @classmethod
    def from_env(cls, default_port: int) -> "ServerSettings":
        host = env_str("TOKENS_HOST", "127.0.0.1")
        tls_dir = env_str("TOKENS_TLS_DIR", "")
        if not tls_dir and not _loopback(host):
            # Anyone who can reach the port could otherwise call Credit.
            raise ConfigError("TOKENS_TLS_DIR", f"required when TOKENS_HOST ({host}) is not a loopback address")
        return cls(
            host=host,
            port=env_int("TOKENS_GRPC_PORT", default_port, minimum=0, maximum=65535),
            log_level=env_str("TOKENS_LOG_LEVEL", "INFO"),
            drain_s=env_float("TOKENS_DRAIN_S", 0.0, minimum=0),
            grace_s=env_float("TOKENS_GRACE_S", 10.0, minimum=0),
            metrics_port=env_int("TOKENS_METRICS_PORT", 0, minimum=0, maximum=65535),
            tls=tls_mod.Files.in_dir(tls_dir, "service") if tls_dir else None,
        )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def public_base_url() -> str:
    """TOKENS_PUBLIC_BASE_URL without a trailing slash (ledger_svc and router_svc both read it)."""
    return env_str("TOKENS_PUBLIC_BASE_URL", PUBLIC_BASE_URL_DEFAULT).rstrip("/")
