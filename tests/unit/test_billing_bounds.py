"""ledger_svc.billing.check_room: the daily maximum of top-ups and the attempts per hour."""
import pytest

from common import money
from ledger_svc import billing

BOUNDS = billing.TopupBounds(day_max_nanos=money.parse_usd("1000.00"), attempts_per_hour=3)
NOW_MS = 1_800_000_000_000


def usd(amount: str) -> int:
    return money.parse_usd(amount)


def test_a_top_up_that_fits_the_day_passes():
    billing.check_room(BOUNDS, usd("400.00"), usd("600.00"), [NOW_MS - 1000], NOW_MS)


def test_one_cent_over_the_day_is_refused_with_what_is_left():
    with pytest.raises(billing.InvalidArgument) as refused:
        billing.check_room(BOUNDS, usd("400.01"), usd("600.00"), [], NOW_MS)
    assert refused.value.code == "daily_topup_limit" and "$400.00 left" in refused.value.message
    assert "contact support" in refused.value.message


def test_attempts_past_the_hour_bound_wait_for_the_oldest_to_leave_the_hour():
    attempts = [NOW_MS - 3_000_000, NOW_MS - 1_000, NOW_MS - 500]
    with pytest.raises(billing.TooManyAttempts) as refused:
        billing.check_room(BOUNDS, usd("5.00"), 0, attempts, NOW_MS)
    assert refused.value.retry_after_s == 600  # the oldest leaves the hour in 600 s
    assert refused.value.grpc_code == "RESOURCE_EXHAUSTED"


def test_the_largest_top_up_is_the_days_maximum():
    assert billing.topup_amount_nanos("1000.00", BOUNDS.day_max_nanos) == usd("1000.00")
    with pytest.raises(billing.InvalidArgument) as refused:
        billing.topup_amount_nanos("1000.01", BOUNDS.day_max_nanos)
    assert refused.value.code == "amount_too_large"
