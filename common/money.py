"""Money is integer nano-dollars (1e-9 USD) inside and decimal strings of USD outside.

No float ever touches an amount: parsing goes through Decimal and refuses
anything finer than a nano-dollar.
"""
import decimal
import re

NANOS_PER_USD = 1_000_000_000
_AMOUNT = re.compile(r"^[+-]?[0-9]{1,15}(\.[0-9]{1,9})?$")


class MoneyError(ValueError):
    """A malformed or too precise amount."""


def usd(nanos: int) -> str:
    """9_999_998_500 -> "9.9999985"; 10 USD -> "10.00"; always at least two decimals."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    digits = f"{frac:09d}".rstrip("0")
    if len(digits) < 2:
        digits = digits.ljust(2, "0")
    return f"{sign}{whole}.{digits}"


def parse_usd(text: str | int) -> int:
    """"5", "5.00", "0.000000001" -> nanos. Refuses floats, exponents, > 9 decimals,
    and more than 15 digits of dollars."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise MoneyError("an amount must be a decimal string of USD")
    raw = str(text).strip()
    if not _AMOUNT.match(raw):
        if re.match(r"^[+-]?[0-9]+\.[0-9]{10,}$", raw):
            raise MoneyError(f"more precise than a nano-dollar: {text!r}")
        raise MoneyError(f"not a decimal amount of USD: {text!r}")
    return int(decimal.Decimal(raw) * NANOS_PER_USD)
