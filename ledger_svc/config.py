"""ledger_svc's settings: one frozen dataclass read once from TOKENS_* variables."""
import dataclasses
import json
import pathlib

from common import catalog, config, money
from ledger_svc import billing

DEFAULT_PORT = 50053
# Read by the docs generator: the public page's "$10 of free credit" comes from here.
SIGNUP_CREDIT_USD_DEFAULT = "10.00"
LOW_BALANCE_USD_DEFAULT = "5.00"
PUBLIC_BASE_URL_DEFAULT = config.PUBLIC_BASE_URL_DEFAULT
HOLD_TTL_S_DEFAULT = config.HOLD_TTL_S_DEFAULT
# A hold no router_svc has claimed (started to run) lapses after this.
HOLD_CLAIM_S_DEFAULT = config.HOLD_CLAIM_S_DEFAULT
EMAIL_FROM_DEFAULT = "token-service billing <billing@tokens.flex.ai>"
LAGO_EVENT_CODE_DEFAULT = "api_call"
BATCH_MAX_DEFAULT = 1000
BATCH_LINGER_MS_DEFAULT = 0.0
AUTH_ADDR_DEFAULT = "127.0.0.1:50051"
STRIPE_JS_URL_DEFAULT = "https://js.stripe.com/v3/"


@dataclasses.dataclass(frozen=True)
class StripeSettings:
    """Card top-ups. No API key: billing is off (its methods answer 503)."""

    api_key: str = ""
    publishable_key: str = ""
    webhook_secret: str = ""
    # Empty: Stripe itself. localstripe: http://127.0.0.1:PORT.
    api_base: str = ""
    # The Stripe.js the dashboard loads (localstripe serves a stand-in at <api_base>/js.stripe.com/v3/).
    js_url: str = STRIPE_JS_URL_DEFAULT
    # Every call to Stripe gives up after this.
    timeout_s: float = 10.0
    # An event signed longer ago than this is refused (a replay).
    webhook_tolerance_s: int = 300
    # Top-ups per account: at most this much in any 24 hours (also the largest single one),
    # and this many tried in any hour (ledger_svc/billing.py says why).
    topup_daily_max_nanos: int = money.parse_usd(billing.TOPUP_DAILY_MAX_USD)
    topup_attempts_per_hour: int = billing.TOPUP_ATTEMPTS_PER_HOUR

    @property
    def topup_bounds(self) -> billing.TopupBounds:
        return billing.TopupBounds(self.topup_daily_max_nanos, self.topup_attempts_per_hour)

    @property
    def enabled(self) -> bool:
        return bool(self.api_key)

    @classmethod
    def from_env(cls) -> "StripeSettings":
        api_key = config.env_str("TOKENS_STRIPE_API_KEY", "")
        api_base = config.env_str("TOKENS_STRIPE_API_BASE", "").rstrip("/")
        settings = cls(
            api_key=api_key, publishable_key=config.env_str("TOKENS_STRIPE_PUBLISHABLE_KEY", ""),
            webhook_secret=config.env_str("TOKENS_STRIPE_WEBHOOK_SECRET", ""), api_base=api_base,
            js_url=config.env_str("TOKENS_STRIPE_JS_URL",
                                  f"{api_base}/js.stripe.com/v3/" if api_base else STRIPE_JS_URL_DEFAULT),
            timeout_s=config.env_float("TOKENS_STRIPE_TIMEOUT_S", 10.0, minimum=0.1),
            webhook_tolerance_s=config.env_int("TOKENS_STRIPE_WEBHOOK_TOLERANCE_S", 300, minimum=1),
            topup_daily_max_nanos=_usd("TOKENS_TOPUP_DAILY_MAX_USD", billing.TOPUP_DAILY_MAX_USD),
            topup_attempts_per_hour=config.env_int("TOKENS_TOPUP_ATTEMPTS_PER_HOUR", billing.TOPUP_ATTEMPTS_PER_HOUR,
                                                   minimum=1, maximum=1000))
        if api_key:
            if not api_key.startswith(("sk_", "rk_")):
                raise config.ConfigError("TOKENS_STRIPE_API_KEY", "expected a secret key (sk_...)")
            if not settings.publishable_key.startswith("pk_"):
                raise config.ConfigError("TOKENS_STRIPE_PUBLISHABLE_KEY", "expected pk_... with TOKENS_STRIPE_API_KEY")
            if not settings.webhook_secret:
                raise config.ConfigError("TOKENS_STRIPE_WEBHOOK_SECRET",
                                         "required with TOKENS_STRIPE_API_KEY: top-ups are credited by its events")
        return settings


@dataclasses.dataclass(frozen=True)
class Settings:
    server: config.ServerSettings
    database_url: str
    # PostgreSQL schema (search_path); None: the server's default.
    database_schema: str | None
    catalog_path: pathlib.Path
    signup_credit_nanos: int
    low_balance_nanos: int
    # Where the 402 body sends people to add funds: <base>/dashboard/billing.
    public_base_url: str
    hold_ttl_s: int
    # smtp://host:port or smtps://user:pass@host:port; empty: .eml files in emails_dir.
    smtp_url: str
    email_from: str
    emails_dir: pathlib.Path
    # Empty: no export to Lago.
    lago_api_url: str
    lago_api_key: str
    lago_event_code: str
    # Group commit: at most this many holds + settlements per transaction, and
    # how long the batcher waits for company once a lone request arrives.
    batch_max: int
    batch_linger_ms: float
    # PostgreSQL only: batches in flight at once (each on its own connection).
    batch_workers: int
    # Other replicas' SetPrice reach this one's price cache within this bound.
    price_refresh_s: float
    stripe: StripeSettings = StripeSettings()
    # auth_svc, told to move an account's keys to Paid after its first top-up.
    auth_addr: str = AUTH_ADDR_DEFAULT
    auth_timeout_s: float = 3.0
    # A hold router_svc has not claimed within this lapses (its call never reached a router).
    hold_claim_s: int = HOLD_CLAIM_S_DEFAULT

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            server=config.ServerSettings.from_env(default_port=DEFAULT_PORT),
            database_url=config.database_url("ledger"),
            database_schema=config.env_str("TOKENS_DATABASE_SCHEMA", "") or None,
            catalog_path=catalog.default_path(),
            signup_credit_nanos=_usd("TOKENS_SIGNUP_CREDIT_USD", SIGNUP_CREDIT_USD_DEFAULT),
            low_balance_nanos=_usd("TOKENS_LOW_BALANCE_USD", LOW_BALANCE_USD_DEFAULT),
            public_base_url=config.public_base_url(),
            hold_ttl_s=config.env_int("TOKENS_HOLD_TTL_S", HOLD_TTL_S_DEFAULT, minimum=1, maximum=7 * 86400),
            smtp_url=_smtp_url(config.env_str("TOKENS_SMTP_URL", "")),
            email_from=config.env_str("TOKENS_EMAIL_FROM", EMAIL_FROM_DEFAULT),
            emails_dir=config.data_dir() / "emails",
            lago_api_url=config.env_str("TOKENS_LAGO_API_URL", "").rstrip("/"),
            lago_api_key=config.env_str("TOKENS_LAGO_API_KEY", ""),
            lago_event_code=config.env_str("TOKENS_LAGO_EVENT_CODE", LAGO_EVENT_CODE_DEFAULT),
            batch_max=config.env_int("TOKENS_LEDGER_BATCH_MAX", BATCH_MAX_DEFAULT, minimum=1, maximum=5000),
            batch_linger_ms=config.env_float("TOKENS_LEDGER_BATCH_LINGER_MS", BATCH_LINGER_MS_DEFAULT, minimum=0),
            batch_workers=config.env_int("TOKENS_LEDGER_BATCH_WORKERS", 1, minimum=1, maximum=16),
            price_refresh_s=config.env_float("TOKENS_PRICE_REFRESH_S", 2.0, minimum=0.1),
            stripe=StripeSettings.from_env(),
            auth_addr=config.env_str("TOKENS_AUTH_ADDR", AUTH_ADDR_DEFAULT),
            auth_timeout_s=config.env_float("TOKENS_AUTH_TIMEOUT_S", 3.0, minimum=0.1),
            hold_claim_s=config.env_int("TOKENS_HOLD_CLAIM_S", HOLD_CLAIM_S_DEFAULT, minimum=1, maximum=7 * 86400),
        )

    @property
    def insufficient_credit_body(self) -> str:
        return insufficient_credit_body(self.public_base_url)


def insufficient_credit_message(base_url: str) -> str:
    return f"Insufficient credit. Add funds at {base_url}/dashboard/billing to continue."


def insufficient_credit_body(base_url: str) -> str:
    """The seed's 402 body, to the byte (json.dumps default separators, no "param")."""
    message = insufficient_credit_message(base_url)
    return json.dumps({"error": {"message": message, "type": "insufficient_quota", "code": "402"}})


def _usd(name: str, default: str) -> int:
    raw = config.env_str(name, default)
    try:
        nanos = money.parse_usd(raw)
    except money.MoneyError as error:
        raise config.ConfigError(name, str(error)) from None
    if nanos < 0:
        raise config.ConfigError(name, "must not be negative")
    return nanos


def _smtp_url(raw: str) -> str:
    if raw and not raw.startswith(("smtp://", "smtps://")):
        raise config.ConfigError("TOKENS_SMTP_URL", f"expected smtp://host:port or smtps://..., got {raw!r}")
    return raw
