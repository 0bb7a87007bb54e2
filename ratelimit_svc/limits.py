"""The one table of limits on clients rather than API keys; docs and settings read it from here.

An API key's tier limits the calls made with it (tiers.py). These limit what a key cannot
count: accounts created from one client address, wrong passwords, verification mails, and
the calls a person makes with a dashboard session. Each is the same exact sliding window
as a key's (domain.SlidingLog, in Redis), over a window of its own, keyed by what it
counts (a client address, an email, an account). Each count can be changed by its setting;
0 turns that limit off.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class ClientLimit:
    name: str
    # At most this many in any `window_s` seconds, per `per`.
    limit: int
    window_s: int
    per: str
    # What is counted, as the public page says it.
    counts: str
    # The TOKENS_ variable that overrides `limit` (0: off).
    setting: str


SIGNUPS_PER_ADDRESS = ClientLimit(
    "signups_per_address", 5, 3600, "client address", "accounts created", "TOKENS_SIGNUPS_PER_IP_PER_HOUR")
LOGIN_FAILURES_PER_EMAIL = ClientLimit(
    "login_failures_per_email", 10, 900, "email", "failed logins", "TOKENS_LOGIN_FAILURES_PER_EMAIL")
LOGIN_FAILURES_PER_ADDRESS = ClientLimit(
    "login_failures_per_address", 30, 900, "client address", "failed logins", "TOKENS_LOGIN_FAILURES_PER_IP")
VERIFY_MAILS_PER_ACCOUNT = ClientLimit(
    "verify_mails_per_account", 3, 3600, "account", "verification emails resent", "TOKENS_VERIFY_MAILS_PER_ACCOUNT")
VERIFY_MAILS_PER_ADDRESS = ClientLimit(
    "verify_mails_per_address", 10, 3600, "client address", "verification emails resent",
    "TOKENS_VERIFY_MAILS_PER_IP")
# The dashboard's overview polls two calls every 5 s (24 a minute): two tabs and some
# clicking stay well inside; a script driving a session does not.
SESSION_CALLS_PER_ACCOUNT = ClientLimit(
    "session_calls_per_account", 120, 60, "account", "calls made with a dashboard session",
    "TOKENS_SESSION_CALLS_PER_MINUTE")
# Each card added is one SetupIntent and one attach: ten cards an hour. Card testers try
# hundreds of stolen numbers through exactly these two calls.
CARD_SETUPS_PER_ACCOUNT = ClientLimit(
    "card_setups_per_account", 20, 3600, "account", "card set-ups (SetupIntents and cards attached)",
    "TOKENS_CARD_SETUPS_PER_HOUR")

LIMITS: tuple[ClientLimit, ...] = (SIGNUPS_PER_ADDRESS, LOGIN_FAILURES_PER_EMAIL, LOGIN_FAILURES_PER_ADDRESS,
                                   VERIFY_MAILS_PER_ACCOUNT, VERIFY_MAILS_PER_ADDRESS, SESSION_CALLS_PER_ACCOUNT,
                                   CARD_SETUPS_PER_ACCOUNT)
BY_NAME = {limit.name: limit for limit in LIMITS}
# Windows of API keys and of these limits never share a Redis key: theirs start "key_".
KEY_PREFIX = "client:"


def window_key(limit: ClientLimit, subject_digest: str) -> str:
    return f"{KEY_PREFIX}{limit.name}:{subject_digest}"


def describe_window(seconds: int) -> str:
    """3600 -> "an hour", 900 -> "15 minutes", 60 -> "a minute"."""
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return "an hour" if hours == 1 else f"{hours} hours"
    if seconds % 60 == 0:
        minutes = seconds // 60
        return "a minute" if minutes == 1 else f"{minutes} minutes"
    return f"{seconds} seconds"
