"""The rules of accounts and keys: secret formats, checksums, hashing, input checks.

API keys look like `tsk_` + 32 random base62 characters + a 6-character
base62 CRC32 of the random part (the GitHub token scheme): a typo or a foreign
string is refused by the checksum before any lookup. Only SHA-256 of the
secret is stored (keys carry 190 bits of entropy, so a slow hash buys nothing),
and the stored hash is compared in constant time. Session tokens are the same
shape with `tss_`, email verification tokens with `tsv_`. Passwords are hashed
with argon2id.

An email address names one account whatever its case, and (with the operator's
plus-tag rule "same", the default) whatever its +tag: email_key() is what is
unique. The address is kept as typed, for mail.
"""
import hashlib
import hmac
import re
import secrets
import zlib

from common import errors
from ratelimit_svc import tiers as _tiers

KEY_PREFIX = "tsk_"
SESSION_PREFIX = "tss_"
VERIFY_PREFIX = "tsv_"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_CHARS = 32
_CHECK_CHARS = 6
# The tiers are ratelimit_svc's table (the one place their names and limits are written),
# ranked as listed there.
TIERS = tuple(t.name for t in _tiers.TIERS)  # in ascending order of limit
TIER_RANK = {name: rank for rank, name in enumerate(TIERS)}
DEFAULT_TIER = _tiers.DEFAULT.name
MAX_EMAIL_CHARS = 254
MAX_PASSWORD_CHARS = 256
MAX_KEY_NAME_CHARS = 100
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")
_COMMON_PASSWORDS = frozenset({
    "password", "password1", "password12", "password123", "passw0rd", "1234567890", "12345678910",
    "qwertyuiop", "qwerty1234", "iloveyou12", "letmein123", "welcome123", "administrator",
    "abcdefghij", "0123456789", "1111111111", "abc1234567", "changeme123", "trustno1234",
})


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_CHARS)


def new_secret(prefix: str) -> str:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_BODY_CHARS))
    return f"{prefix}{body}{_checksum(body)}"


def well_formed(secret: str, prefix: str) -> bool:
    """Shape and checksum only: no lookup, no timing worth measuring."""
    if len(secret) != len(prefix) + _BODY_CHARS + _CHECK_CHARS or not secret.startswith(prefix):
        return False
    body, check = secret[len(prefix):-_CHECK_CHARS], secret[-_CHECK_CHARS:]
    if not (body.isascii() and body.isalnum()):  # exactly _ALPHABET's characters
        return False
    return hmac.compare_digest(_checksum(body), check)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_hash(stored: str, presented: str) -> bool:
    return hmac.compare_digest(stored.encode(), presented.encode())


def display(secret: str) -> str:
    return f"{secret[:8]}...{secret[-4:]}"


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(16))


def normalize_email(raw: str) -> str:
    email = (raw or "").strip()
    if not email:
        raise errors.InvalidRequest("email is required", param="email", code="invalid_email")
    if len(email) > MAX_EMAIL_CHARS or not _EMAIL.match(email):
        raise errors.InvalidRequest("email is not a valid address", param="email", code="invalid_email")
    local, _, domain = email.rpartition("@")
    return f"{local}@{domain.lower()}"


def email_key(email: str, plus_tags: str) -> str:
    """What makes an address unique: lower case and, under the rule "same", no +tag in the
    local part (alice+news@ is alice@: one inbox gets one free credit)."""
    local, _, domain_part = email.lower().rpartition("@")
    if plus_tags == "same":
        local = local.split("+", 1)[0] or local
    return f"{local}@{domain_part}"


def keys_max(tier: str) -> int:
    return _tiers.lookup(tier).keys_max


def check_password(password: str, email: str, min_chars: int) -> None:
    """Refuses weak passwords with a message that says what would pass."""
    if not password:
        raise errors.InvalidRequest("password is required", param="password", code="weak_password")
    if len(password) > MAX_PASSWORD_CHARS:
        raise errors.InvalidRequest(f"password must be at most {MAX_PASSWORD_CHARS} characters",
                                    param="password", code="weak_password")
    if len(password) < min_chars:
        raise errors.InvalidRequest(f"password must be at least {min_chars} characters",
                                    param="password", code="weak_password")
    lowered = password.lower()
    if lowered in _COMMON_PASSWORDS or len(set(password)) < 4 or lowered == email.lower() \
            or lowered == email.split("@")[0].lower():
        raise errors.InvalidRequest("password is too easy to guess: use a longer phrase or a mix of "
                                    "characters that is not your email", param="password",
                                    code="weak_password")


def check_key_name(name: str) -> str:
    name = (name or "").strip()
    if len(name) > MAX_KEY_NAME_CHARS:
        raise errors.InvalidRequest(f"name must be at most {MAX_KEY_NAME_CHARS} characters", param="name")
    if any(ord(c) < 32 for c in name):
        raise errors.InvalidRequest("name must not contain control characters", param="name")
    return name


def highest_tier(names) -> str:
    return max(names, key=lambda t: TIER_RANK.get(t, 0), default=DEFAULT_TIER)


def tiers_below(tier: str) -> list[str]:
    return [t for t in TIERS if TIER_RANK[t] < TIER_RANK[tier]]


def check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise errors.InvalidRequest(f"tier must be one of {', '.join(TIERS)}", param="tier",
                                    code="invalid_tier")
    return tier
