"""The sliding window's arithmetic, with a fake clock: no network, no Redis."""
import pytest

from ratelimit_svc import domain, tiers

T0_MS = 1_700_000_000_000  # a whole second, so rounding is easy to read


class FakeClock:
    def __init__(self, now_ms: int = T0_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def at(self, offset_ms: int) -> "FakeClock":
        self.now_ms = T0_MS + offset_ms
        return self


def fill(windows: domain.Windows, key_id: str, limit: int, count: int) -> list[domain.Decision]:
    return [windows.hit(key_id, limit) for _ in range(count)]


def test_tier_table_is_the_public_one():
    assert [(t.name, t.title, t.requests_per_minute) for t in tiers.TIERS] == [
        ("free", "Free (default on signup)", 10),
        ("elevated", "Elevated (approved users)", 60),
        ("paid", "Paid", 300),
    ]
    assert tiers.WINDOW_S == 60


@pytest.mark.parametrize("name, expected", [
    ("free", tiers.FREE), ("elevated", tiers.ELEVATED), ("paid", tiers.PAID),
    ("Paid", tiers.PAID), (" elevated ", tiers.ELEVATED),
    ("", tiers.FREE), ("gold", tiers.FREE), ("unlimited", tiers.FREE),
])
def test_unknown_tier_names_fall_back_to_free(name, expected):
    assert tiers.lookup(name) is expected


def test_tenth_call_admitted_eleventh_refused():
    windows = domain.Windows(FakeClock())
    decisions = fill(windows, "k", 10, 10)
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert [d.used for d in decisions] == list(range(1, 11))
    refused = windows.hit("k", 10)
    assert not refused.allowed
    assert (refused.used, refused.remaining) == (10, 0)


def test_slot_frees_exactly_one_window_after_the_first_admitted_call():
    clock = FakeClock()
    windows = domain.Windows(clock)
    windows.hit("k", 10)                      # t = 0: the first call
    clock.at(5_000)
    fill(windows, "k", 10, 9)                 # t = 5 s: the other nine
    clock.at(59_999)
    assert not windows.hit("k", 10).allowed   # one ms early: still full
    clock.at(60_000)
    freed = windows.hit("k", 10)
    assert freed.allowed and freed.remaining == 0
    # The slot t=0 freed is now taken again; the next frees at 5 s + 60 s.
    refused = windows.hit("k", 10)
    assert not refused.allowed
    assert refused.retry_after_s == 5
    assert refused.reset_s == (T0_MS + 65_000) // 1000


def test_no_burst_at_a_fixed_window_edge():
    clock = FakeClock()
    windows = domain.Windows(clock)
    clock.at(59_000)
    assert all(d.allowed for d in fill(windows, "k", 10, 10))
    clock.at(61_000)
    second_burst = fill(windows, "k", 10, 10)
    assert not any(d.allowed for d in second_burst)
    # Any 60 s window holds at most 10: the next admission is at 59 s + 60 s.
    clock.at(118_999)
    assert not windows.hit("k", 10).allowed
    clock.at(119_000)
    assert all(d.allowed for d in fill(windows, "k", 10, 10))
    assert not windows.hit("k", 10).allowed


def test_refused_calls_are_not_counted():
    clock = FakeClock()
    windows = domain.Windows(clock)
    fill(windows, "k", 10, 10)
    for offset_ms in range(1_000, 60_000, 1_000):
        clock.at(offset_ms)
        assert not windows.hit("k", 10).allowed
    clock.at(60_000)
    # Had the 59 refusals counted, the window would still be full.
    assert all(d.allowed for d in fill(windows, "k", 10, 10))


def test_reset_is_the_oldest_admission_plus_the_window_rounded_up():
    clock = FakeClock()
    windows = domain.Windows(clock)
    clock.at(1)  # 1 ms past a whole second: rounds up to the next second
    first = windows.hit("k", 10)
    assert first.reset_s == T0_MS // 1000 + 61
    clock.at(30_000)
    later = windows.hit("k", 10)
    assert later.reset_s == T0_MS // 1000 + 61  # still the oldest call's slot
    assert later.retry_after_s == 0


@pytest.mark.parametrize("offset_ms, retry_after_s", [
    (0, 60),         # full the moment it filled: a whole window to wait
    (1, 60),         # 59.999 s to wait rounds up to 60
    (1_000, 59),
    (58_999, 2),     # 1.001 s rounds up to 2
    (59_000, 1),
    (59_999, 1),     # 1 ms to wait is still 1 s, never 0
])
def test_retry_after_rounds_up_and_stays_within_1_to_60(offset_ms, retry_after_s):
    clock = FakeClock()
    windows = domain.Windows(clock)
    fill(windows, "k", 10, 10)
    clock.at(offset_ms)
    refused = windows.hit("k", 10)
    assert not refused.allowed
    assert refused.retry_after_s == retry_after_s
    assert refused.reset_s == T0_MS // 1000 + 60


def test_outcome_clamps_retry_after():
    late = domain.outcome(allowed=False, used=10, limit=10, frees_at_ms=T0_MS, now_ms=T0_MS + 5)
    assert late.retry_after_s == 1
    early = domain.outcome(allowed=False, used=10, limit=10, frees_at_ms=T0_MS + 300_000, now_ms=T0_MS)
    assert early.retry_after_s == 60


def test_tier_upgrade_keeps_the_count():
    windows = domain.Windows(FakeClock())
    fill(windows, "k", tiers.FREE.requests_per_minute, 10)
    assert not windows.hit("k", tiers.FREE.requests_per_minute).allowed
    upgraded = windows.hit("k", tiers.ELEVATED.requests_per_minute)
    assert upgraded.allowed
    assert (upgraded.used, upgraded.remaining) == (11, 49)


def test_tier_downgrade_waits_until_the_count_is_under_the_new_limit():
    clock = FakeClock()
    windows = domain.Windows(clock)
    for second in range(50):  # 50 paid calls, one a second
        clock.at(second * 1000)
        assert windows.hit("k", tiers.PAID.requests_per_minute).allowed
    clock.at(50_000)
    refused = windows.hit("k", tiers.FREE.requests_per_minute)
    assert not refused.allowed
    assert (refused.used, refused.remaining) == (50, 0)
    # 41 calls must leave the window (t = 0..40 s) before 9 remain: at 100 s.
    assert refused.retry_after_s == 50
    assert refused.reset_s == T0_MS // 1000 + 100
    clock.at(99_999)
    assert not windows.hit("k", 10).allowed
    clock.at(100_000)
    assert windows.hit("k", 10).allowed


def test_keys_have_their_own_windows():
    windows = domain.Windows(FakeClock())
    fill(windows, "a", 10, 10)
    assert not windows.hit("a", 10).allowed
    assert windows.hit("b", 10).allowed


def test_peek_counts_without_logging():
    clock = FakeClock()
    windows = domain.Windows(clock)
    empty = windows.peek("k", 10)
    assert (empty.used, empty.remaining, empty.reset_s) == (0, 10, T0_MS // 1000)
    fill(windows, "k", 10, 3)
    for _ in range(5):
        seen = windows.peek("k", 10)
    assert (seen.used, seen.remaining, seen.allowed) == (3, 7, True)
    assert seen.reset_s == T0_MS // 1000 + 60


def test_memory_is_bounded_least_recently_used_first():
    windows = domain.Windows(FakeClock(), keys_max=3)
    for key_id in ("a", "b", "c"):
        fill(windows, key_id, 10, 10)
    windows.hit("a", 10)   # touch a: b is now the least recently used
    windows.hit("d", 10)
    assert len(windows) == 3
    assert windows.hit("b", 10).allowed          # forgotten: starts empty
    assert not windows.hit("a", 10).allowed      # kept


def test_snapshot_holds_only_admissions_inside_the_window():
    clock = FakeClock()
    windows = domain.Windows(clock)
    windows.hit("old", 10)
    clock.at(30_000)
    fill(windows, "new", 10, 2)
    clock.at(60_000)
    assert windows.snapshot() == [("new", [T0_MS + 30_000, T0_MS + 30_000], domain.WINDOW_MS)]


def test_a_window_of_its_own_caps_retry_after_by_it_and_a_call_can_be_taken_back():
    clock = FakeClock()
    windows = domain.Windows(clock)
    hour_ms = 3_600_000
    first = windows.hit("signups", 2, window_ms=hour_ms)
    windows.hit("signups", 2, window_ms=hour_ms)
    clock.at(61_000)  # past a key's window, well inside the hour's
    refused = windows.hit("signups", 2, window_ms=hour_ms)
    assert not refused.allowed and refused.retry_after_s == 3600 - 61
    assert windows.snapshot() == [("signups", [T0_MS, T0_MS], hour_ms)]
    assert windows.remove("signups", first.at_ms)
    assert windows.hit("signups", 2, window_ms=hour_ms).allowed
    assert not windows.remove("signups", T0_MS + 5)  # never admitted then: nothing to take back
