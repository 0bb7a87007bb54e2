"""Settings of the reference backend, read once from TOKENS_BACKEND_* variables."""

import dataclasses
import math
import os
from collections.abc import Mapping

from backends.reference import text

RECORD_REQUESTS_MAX = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8100  # 0 picks a free port
    token_delay_ms: float = 0.0  # pause between two tokens of one choice
    default_tokens: int = 16  # answer length when the prompt has no [[tokens=N]]
    api_key: str = ""  # empty: no authentication
    # Tests only. misbehave: honour misbehave.py's directives (a backend that lies);
    # record_requests: keep the latest N request bodies, served at GET /_requests.
    misbehave: bool = False
    record_requests: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Reads the environment; a bad value raises SystemExit naming the variable."""
        env = os.environ if env is None else env
        defaults = cls()
        return cls(
            host=_text(env, "TOKENS_BACKEND_HOST", defaults.host, empty_ok=False),
            port=_integer(env, "TOKENS_BACKEND_PORT", defaults.port, 65535),
            token_delay_ms=_delay_ms(env, "TOKENS_BACKEND_TOKEN_DELAY_MS", defaults.token_delay_ms),
            default_tokens=_integer(env, "TOKENS_BACKEND_DEFAULT_TOKENS", defaults.default_tokens,
                                    text.TOKENS_MAX),
            api_key=_text(env, "TOKENS_BACKEND_API_KEY", defaults.api_key, empty_ok=True),
            misbehave=_integer(env, "TOKENS_BACKEND_MISBEHAVE", 0, 1) == 1,
            record_requests=_integer(env, "TOKENS_BACKEND_RECORD_REQUESTS", 0, RECORD_REQUESTS_MAX),
        )


def _text(env: Mapping[str, str], name: str, default: str, empty_ok: bool) -> str:
    value = env.get(name, default).strip()
    if not value and not empty_ok:
        raise SystemExit(f"{name} must not be empty")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, value_max: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None
    if not 0 <= value <= value_max:
        raise SystemExit(f"{name}={raw!r} must be between 0 and {value_max}")
    return value


def _delay_ms(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number") from None
    if not (math.isfinite(value) and 0 <= value <= text.DELAY_MS_MAX):
        raise SystemExit(f"{name}={raw!r} must be between 0 and {text.DELAY_MS_MAX}")
    return value
