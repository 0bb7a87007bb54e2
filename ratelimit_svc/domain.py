"""Sliding-log window arithmetic: pure, no grpc or redis, time passed in.

A key's window is the log of the times (Unix milliseconds) of the calls it was
admitted for (API keys over WINDOW_MS; the limits on clients in ratelimit_svc/limits.py
over windows of their own). At time `now` a call counts while `now - window_ms < t`, so
the slot a call used frees exactly `window_ms` after it. A call is admitted when
fewer than `limit` calls count; refused calls are not logged, so hammering a
full window does not push its end further out. The limit comes with each call
(the tier arrives in a header), so a tier change applies to the next call and
keeps the count.
"""
import bisect
import collections
import dataclasses
import time
from collections.abc import Callable

from ratelimit_svc import tiers

# Unix time in milliseconds.
Clock = Callable[[], int]
WINDOW_MS = tiers.WINDOW_S * 1000


def system_clock() -> int:
    return time.time_ns() // 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    # Calls counting in the window, this one included when it was admitted.
    used: int
    remaining: int
    # Unix seconds, rounded up, when the window frees its next slot (refused:
    # the moment a call would be admitted again).
    reset_s: int
    # Whole seconds until a call would be admitted, 1..the window; 0 when admitted.
    retry_after_s: int
    # Unix ms of the decision: an admitted call's place in the log (see SlidingLog.remove).
    at_ms: int = 0


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def outcome(*, allowed: bool, used: int, limit: int, frees_at_ms: int, now_ms: int,
            window_ms: int = WINDOW_MS) -> Decision:
    """The Decision for a window once its count and next freeing moment are known.

    `frees_at_ms` is when the next slot frees: the oldest counted call plus the
    window; for a refusal, when the count drops below `limit` (the same moment
    unless the tier was lowered while the window was fuller than the new limit).
    """
    remaining = limit - used if used < limit else 0
    reset_s = ceil_div(frees_at_ms, 1000)
    if allowed:
        return Decision(True, limit, used, remaining, reset_s, 0, now_ms)
    retry_after_s = min(max(ceil_div(frees_at_ms - now_ms, 1000), 1), ceil_div(window_ms, 1000))
    return Decision(False, limit, used, remaining, reset_s, retry_after_s, now_ms)


class SlidingLog:
    """One key's admitted call times, kept sorted; at most the highest limit seen long."""

    __slots__ = ("times_ms", "window_ms")

    def __init__(self, window_ms: int = WINDOW_MS) -> None:
        self.times_ms: list[int] = []
        # The window this log was last decided over (copied back to Redis with it).
        self.window_ms = window_ms

    def prune(self, now_ms: int, window_ms: int = WINDOW_MS) -> None:
        cut = bisect.bisect_right(self.times_ms, now_ms - window_ms)
        if cut:
            del self.times_ms[:cut]

    def admit(self, now_ms: int, limit: int, window_ms: int = WINDOW_MS) -> Decision:
        """Admits a call at `now_ms` if the window has room, logging it; refusals are not logged."""
        assert limit > 0, limit
        self.window_ms = window_ms
        self.prune(now_ms, window_ms)
        times = self.times_ms
        used = len(times)
        if used < limit:
            bisect.insort(times, now_ms)
            return outcome(allowed=True, used=used + 1, limit=limit,
                           frees_at_ms=times[0] + window_ms, now_ms=now_ms, window_ms=window_ms)
        return outcome(allowed=False, used=used, limit=limit,
                       frees_at_ms=times[used - limit] + window_ms, now_ms=now_ms, window_ms=window_ms)

    def remove(self, at_ms: int) -> bool:
        """Takes back one call admitted at `at_ms` (a login that turned out right)."""
        index = bisect.bisect_left(self.times_ms, at_ms)
        if index < len(self.times_ms) and self.times_ms[index] == at_ms:
            del self.times_ms[index]
            return True
        return False

    def peek(self, now_ms: int, limit: int, window_ms: int = WINDOW_MS) -> Decision:
        """What the window holds now, logging nothing; `allowed` says whether a call would pass."""
        assert limit > 0, limit
        self.prune(now_ms, window_ms)
        times = self.times_ms
        used = len(times)
        if used < limit:
            frees_at_ms = times[0] + window_ms if times else now_ms
            return outcome(allowed=True, used=used, limit=limit, frees_at_ms=frees_at_ms, now_ms=now_ms,
                           window_ms=window_ms)
        return outcome(allowed=False, used=used, limit=limit,
                       frees_at_ms=times[used - limit] + window_ms, now_ms=now_ms, window_ms=window_ms)


class Windows:
    """Sliding logs for many keys, at most `keys_max` of them: the least recently
    used key is forgotten first (its window restarts empty if it comes back)."""

    def __init__(self, clock: Clock = system_clock, *, keys_max: int = 100_000,
                 window_ms: int = WINDOW_MS) -> None:
        assert keys_max > 0, keys_max
        self._clock = clock
        self._keys_max = keys_max
        self._window_ms = window_ms
        self._logs: collections.OrderedDict[str, SlidingLog] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._logs)

    def hit(self, key_id: str, limit: int, now_ms: int | None = None, window_ms: int | None = None) -> Decision:
        """Decides a call over `window_ms` (default: the windows' own)."""
        window_ms = window_ms or self._window_ms
        logs = self._logs
        log = logs.get(key_id)
        if log is None:
            log = logs[key_id] = SlidingLog(window_ms)
            if len(logs) > self._keys_max:
                logs.popitem(last=False)
        else:
            logs.move_to_end(key_id)
        return log.admit(self._clock() if now_ms is None else now_ms, limit, window_ms)

    def peek(self, key_id: str, limit: int, now_ms: int | None = None, window_ms: int | None = None) -> Decision:
        window_ms = window_ms or self._window_ms
        now_ms = self._clock() if now_ms is None else now_ms
        log = self._logs.get(key_id)
        if log is None:
            return SlidingLog(window_ms).peek(now_ms, limit, window_ms)
        return log.peek(now_ms, limit, window_ms)

    def remove(self, key_id: str, at_ms: int) -> bool:
        log = self._logs.get(key_id)
        return log is not None and log.remove(at_ms)

    def snapshot(self, now_ms: int | None = None) -> list[tuple[str, list[int], int]]:
        """(key id, admitted times still inside its window, that window in ms) for every key with any."""
        now_ms = self._clock() if now_ms is None else now_ms
        out = []
        for key_id, log in self._logs.items():
            log.prune(now_ms, log.window_ms)
            if log.times_ms:
                out.append((key_id, list(log.times_ms), log.window_ms))
        return out

    def clear(self) -> None:
        self._logs.clear()
