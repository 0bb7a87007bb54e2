"""Billing's rules: what a top-up may be, its states, and what a Stripe event does to it.

Pure Python: no grpc, SQL, HTTP or stripe import here (stripe_client.py talks to
Stripe, stripe_store.py keeps the rows, stripe_service.py serves the API).

A top-up is charged with a Stripe PaymentIntent created and confirmed in one
call; the balance is credited only when Stripe's payment_intent.succeeded event
arrives, as a journal transfer of kind "payment" whose id is derived from the
PaymentIntent ("stripe:<pi id>"). The journal makes a transfer id happen once,
so an event delivered again, or five times at once, credits once. The docs
generator (devtool/docs.py) reads TOPUP_MIN_USD from here.
"""
import dataclasses
import re

from common import errors, money

# The public page's "Top up by any amount >= $5".
TOPUP_MIN_USD = "5.00"
# Top-ups of one account in any 24 hours, failed ones left out, add up to at most this
# (TOKENS_TOPUP_DAILY_MAX_USD): a stolen card, or a typo of a few zeros, costs at most a day's
# maximum; more is for support to arrange. It is also the largest single top-up.
TOPUP_DAILY_MAX_USD = "1000.00"
DAY_MS = 86_400_000
# Top-ups an account may try in any hour, failed ones included (TOKENS_TOPUP_ATTEMPTS_PER_HOUR):
# card testers try many cards in a row; people do not.
TOPUP_ATTEMPTS_PER_HOUR = 10
HOUR_MS = 3_600_000
CURRENCY = "usd"
NANOS_PER_CENT = money.NANOS_PER_USD // 100

PENDING, REQUIRES_ACTION, SUCCEEDED, FAILED = "pending", "requires_action", "succeeded", "failed"
STATUSES = (PENDING, REQUIRES_ACTION, SUCCEEDED, FAILED)

# The tier an account's first credited top-up moves its keys to (unless they are higher).
PAID_TIER = "paid"
TIER_OWED, TIER_DONE = "pending", "done"

# Emails billing sends through the ledger's outbox (emails.py renders them).
EMAIL_TOPUP_FAILED = "topup_failed"
EMAIL_TIER_CHANGED = "tier_changed"
# auth_svc's verification link: the one email sent to an address the account does not hold
# yet (the ledger is given the address only once it is verified).
EMAIL_VERIFY = "verify_email"
# Kinds another service may ask the ledger to send (Ledger.QueueEmail).
QUEUEABLE_EMAILS = (EMAIL_TIER_CHANGED, EMAIL_VERIFY)

SUCCEEDED_EVENT = "payment_intent.succeeded"
FAILED_EVENT = "payment_intent.payment_failed"
EVENTS = (SUCCEEDED_EVENT, FAILED_EVENT)

TOPUPS_LIMIT_DEFAULT = 20
TOPUPS_LIMIT_MAX = 100
FAILURE_MESSAGE_MAX = 500
_PAYMENT_METHOD = re.compile(r"^(pm|card|src)_[A-Za-z0-9_]{1,60}$")
_TOPUP_ID = re.compile(r"^topup_[A-Za-z0-9]{1,32}$")


class BillingError(Exception):
    """A request billing refuses; `grpc_code` names the google.rpc code (server.py maps it)."""

    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class InvalidArgument(BillingError):
    pass


class NotFound(BillingError):
    grpc_code = "NOT_FOUND"


class Unavailable(BillingError):
    grpc_code = "UNAVAILABLE"


class TooManyAttempts(BillingError):
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, code: str, retry_after_s: int) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class TopupBounds:
    """The most one account may top up in any day, and try in any hour."""
    day_max_nanos: int
    attempts_per_hour: int


def check_room(bounds: TopupBounds, amount_nanos: int, day_total_nanos: int, hour_attempts_ms: list[int],
               now_ms: int) -> None:
    """Refuses a top-up over the account's bounds, given its top-ups of the last day (not failed)
    and the times of its attempts in the last hour."""
    if len(hour_attempts_ms) >= bounds.attempts_per_hour:
        oldest = sorted(hour_attempts_ms)[len(hour_attempts_ms) - bounds.attempts_per_hour]
        wait_s = max(1, -(-(oldest + HOUR_MS - now_ms) // 1000))
        raise TooManyAttempts(f"Too many top-ups tried in the last hour (at most {bounds.attempts_per_hour}). "
                              f"Retry after {wait_s} seconds, or contact support@flex.ai.",
                              code="too_many_topup_attempts", retry_after_s=wait_s)
    if day_total_nanos + amount_nanos > bounds.day_max_nanos:
        left = max(bounds.day_max_nanos - day_total_nanos, 0)
        raise InvalidArgument(
            f"Top-ups are limited to ${money.usd(bounds.day_max_nanos)} in any 24 hours per account "
            f"(${money.usd(left)} left now). To add more, contact support@flex.ai.",
            code="daily_topup_limit", param="amount_usd")

def topup_amount_nanos(raw: str, max_nanos: int) -> int:
    """The amount of a top-up request: USD, whole cents, between the minimum and the maximum."""
    try:
        nanos = money.parse_usd(raw)
    except money.MoneyError:
        raise InvalidArgument(f"amount_usd must be a decimal amount of USD such as \"{TOPUP_MIN_USD}\"",
                              code="invalid_amount", param="amount_usd") from None
    if nanos % NANOS_PER_CENT:
        raise InvalidArgument("amount_usd must be a whole number of cents", code="invalid_amount",
                              param="amount_usd")
    if nanos < money.parse_usd(TOPUP_MIN_USD):
        raise InvalidArgument(f"The smallest top-up is ${TOPUP_MIN_USD}.", code="amount_too_small",
                              param="amount_usd")
    if nanos > max_nanos:
        raise InvalidArgument(f"The largest top-up is ${money.usd(max_nanos)}; contact support@flex.ai for more.",
                              code="amount_too_large", param="amount_usd")
    return nanos


def cents(nanos: int) -> int:
    assert nanos % NANOS_PER_CENT == 0, nanos
    return nanos // NANOS_PER_CENT


def payment_method_id(raw: str) -> str:
    value = (raw or "").strip()
    if not _PAYMENT_METHOD.match(value):
        raise InvalidArgument("payment_method must be a Stripe PaymentMethod id (pm_...)",
                              code="invalid_payment_method", param="payment_method")
    return value


def topup_id(raw: str) -> str:
    if not _TOPUP_ID.match(raw or ""):
        raise NotFound(f"no top-up {errors.echo(raw)!r}", code="topup_not_found", param="topup_id")
    return raw


def topups_limit(limit: int) -> int:
    if limit < 0 or limit > TOPUPS_LIMIT_MAX:
        raise InvalidArgument(f"limit must be between 1 and {TOPUPS_LIMIT_MAX}", code="invalid_limit",
                              param="limit")
    return limit or TOPUPS_LIMIT_DEFAULT


def transfer_id(payment_intent_id: str) -> str:
    """The journal transfer a PaymentIntent credits: one per PaymentIntent, ever."""
    return f"stripe:{payment_intent_id}"


@dataclasses.dataclass(frozen=True)
class Topup:
    id: str
    account_id: str
    amount_nanos: int
    currency: str
    payment_method: str
    status: str
    created_ms: int
    card_brand: str = ""
    card_last4: str = ""
    failure_message: str = ""
    payment_intent_id: str | None = None
    client_secret: str = ""
    credited_ms: int = 0
    tier_status: str = ""


@dataclasses.dataclass(frozen=True)
class Payment:
    """What a verified Stripe event says about one PaymentIntent."""

    event_type: str
    payment_intent_id: str
    customer_id: str
    amount_cents: int
    currency: str
    # Our ids, which we put in the PaymentIntent's metadata when we created it.
    account_id: str
    topup_id: str
    failure_message: str = ""

    @property
    def amount_nanos(self) -> int:
        return self.amount_cents * NANOS_PER_CENT


def payment_of(event_type: str, intent: dict) -> Payment | None:
    """The payment a payment_intent.* event reports; None for an event billing does not act on."""
    if event_type not in EVENTS or not isinstance(intent, dict):
        return None
    metadata = intent.get("metadata") or {}
    # amount_received is what was actually captured; localstripe leaves it out.
    amount = intent.get("amount_received") or intent.get("amount") or 0
    error = intent.get("last_payment_error") or {}
    return Payment(event_type=event_type, payment_intent_id=str(intent.get("id") or ""),
                   customer_id=str(intent.get("customer") or ""), amount_cents=int(amount),
                   currency=str(intent.get("currency") or "").lower(),
                   account_id=str(metadata.get("account_id") or ""), topup_id=str(metadata.get("topup_id") or ""),
                   failure_message=failure_message(error.get("message") if isinstance(error, dict) else ""))


def failure_message(raw: str | None) -> str:
    text = " ".join((raw or "").split())
    return (text or "The payment was declined.")[:FAILURE_MESSAGE_MAX]


def status_of_intent(intent_status: str) -> str:
    """Our top-up status right after creating and confirming its PaymentIntent. Even a
    PaymentIntent that succeeded at once stays pending here: only the event credits."""
    if intent_status == "requires_action":
        return REQUIRES_ACTION
    if intent_status in ("requires_payment_method", "canceled"):
        return FAILED
    return PENDING

