"""What a call costs: units times per-unit prices, in exact integer arithmetic.

Shared by ledger_svc (which charges) and router_svc (which shows the caller the
same number before the charge is posted). Rounding rule: every unit's cost is
computed exactly as a fraction of a nano-dollar, the fractions are summed, and
the call's total is rounded half up to a whole nano-dollar, once per call.
"""
from collections.abc import Mapping

from common import money

# price unit name -> (usage field, how many usage units the price is quoted for)
UNITS: dict[str, tuple[str, int]] = {
    "input_per_million_tokens": ("input_tokens", 1_000_000),
    "output_per_million_tokens": ("output_tokens", 1_000_000),
    "per_image": ("images", 1),
    "per_second": ("video_ms", 1_000),
    "per_character": ("characters", 1),
    "per_minute": ("audio_ms", 60_000),
}
USAGE_FIELDS = tuple(field for field, _ in UNITS.values())
# A common denominator of every scale, so one integer division does the rounding.
_DENOMINATOR = 3_000_000


def parse_prices(pricing_usd: Mapping[str, str]) -> dict[str, int]:
    """{"input_per_million_tokens": "0.50"} -> {"input_per_million_tokens": 500_000_000}."""
    prices = {}
    for unit, amount in pricing_usd.items():
        if unit not in UNITS:
            raise ValueError(f"unknown price unit {unit!r}; known: {', '.join(UNITS)}")
        nanos = money.parse_usd(amount)
        if nanos < 0:
            raise ValueError(f"price {unit} is negative")
        prices[unit] = nanos
    return prices


def cost_nanos(prices_nanos: Mapping[str, int], usage: Mapping[str, int]) -> int:
    """Exact cost of `usage` (usage field -> count) at `prices_nanos` (unit -> nanos)."""
    numerator = 0
    for unit, price in prices_nanos.items():
        field, scale = UNITS[unit]
        count = usage.get(field, 0)
        if count:
            numerator += count * price * (_DENOMINATOR // scale)
    return (numerator + _DENOMINATOR // 2) // _DENOMINATOR


def encode_header(prices_nanos: Mapping[str, int]) -> str:
    """Prices as a compact header value: "input_per_million_tokens=500000000,..."."""
    return ",".join(f"{unit}={nanos}" for unit, nanos in sorted(prices_nanos.items()))


def decode_header(value: str) -> dict[str, int]:
    prices = {}
    for part in value.split(","):
        if not part:
            continue
        unit, _, nanos = part.partition("=")
        if unit not in UNITS:
            raise ValueError(f"unknown price unit {unit!r}")
        prices[unit] = int(nanos)
    return prices
