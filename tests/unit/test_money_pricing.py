"""Money strings and the pricing arithmetic shared by the ledger and the router."""
from fractions import Fraction

import pytest
from hypothesis import given, strategies as st

from common import money, pricing


@pytest.mark.parametrize("nanos,text", [
    (0, "0.00"), (10_000_000_000, "10.00"), (9_999_998_500, "9.9999985"), (1, "0.000000001"),
    (-500_000_000, "-0.50"), (5_120_000_000, "5.12"), (123_456_789_012, "123.456789012"),
])
def test_usd_strings(nanos, text):
    assert money.usd(nanos) == text
    assert money.parse_usd(text) == nanos


@pytest.mark.parametrize("bad", ["", "abc", "1e3", "0.0000000001", "5.", "--5", "1,5", 5.0, True, None, "NaN"])
def test_parse_refuses_what_is_not_an_exact_amount(bad):
    with pytest.raises(money.MoneyError):
        money.parse_usd(bad)


@given(st.integers(min_value=-10**15, max_value=10**15))
def test_round_trip(nanos):
    assert money.parse_usd(money.usd(nanos)) == nanos


PRICES = pricing.parse_prices({"input_per_million_tokens": "0.50", "output_per_million_tokens": "1.50",
                               "per_image": "0.04", "per_second": "0.10", "per_character": "0.000015",
                               "per_minute": "0.006"})


def test_known_costs():
    assert pricing.cost_nanos(PRICES, {"input_tokens": 9, "output_tokens": 16}) == 9 * 500 + 16 * 1500
    assert pricing.cost_nanos(PRICES, {"images": 2}) == 80_000_000
    assert pricing.cost_nanos(PRICES, {"characters": 11}) == 165_000
    assert pricing.cost_nanos(PRICES, {"audio_ms": 30_000}) == 3_000_000  # half a minute
    assert pricing.cost_nanos(PRICES, {"video_ms": 4_000}) == 400_000_000


@given(st.dictionaries(st.sampled_from(pricing.USAGE_FIELDS), st.integers(0, 10**9)))
def test_cost_is_the_exact_sum_rounded_half_up_once(usage):
    exact = sum(Fraction(usage.get(field, 0) * PRICES[unit], scale)
                for unit, (field, scale) in pricing.UNITS.items())
    cost = pricing.cost_nanos(PRICES, usage)
    assert cost - Fraction(1, 2) <= exact < cost + Fraction(1, 2)


def test_price_header_round_trip_and_unknown_units():
    assert pricing.decode_header(pricing.encode_header(PRICES)) == PRICES
    with pytest.raises(ValueError):
        pricing.parse_prices({"per_token": "1"})
    with pytest.raises(ValueError):
        pricing.decode_header("per_token=5")
