"""Password hashing that cannot starve the gateway: argon2id on a bounded pool of threads.

Each hash is ~64 MiB and tens of milliseconds of one core, on purpose. Run on the event
loop, a burst of logins would stall every Check auth_svc answers; run on an unbounded
pool, it would take every core from Envoy and the other services. So hashes run on at
most `threads` threads, each of Linux's SCHED_IDLE policy: a thread of any other process
that wakes up preempts it at once, and a core running only such threads counts as idle
when the kernel places work (nice alone would not do: with autogroup scheduling it
counts only against threads of the same session, and every service has its own). At
most `queue_max` more wait, none longer than `wait_max_s`; a login or signup beyond that
is refused (503, Retry-After) instead of queueing without end. A slot is freed when its
hash ends, not when its caller leaves, so callers who hang up cannot pile hashes up
behind the bound.
"""
import asyncio
import concurrent.futures
import contextlib
import os
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from common import errors

# argon2's lanes are threads of its own (the library's default is 4): one lane makes a thread
# of the pool one core at most, so the pool's size is the CPU hashing can take. Hashes made
# with more lanes (before) still verify: their parameters are in the hash.
LANES = 1
BUSY = errors.Unavailable("Too many logins and signups at once; try again in a few seconds.",
                          code="server_busy", retry_after_s=1)


def _lowest_priority() -> None:
    """For the calling thread (Linux's scheduling calls act on a thread)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class _Late(Exception):
    """A hash that waited past its deadline: its caller is told to come back instead."""


class Passwords:
    def __init__(self, *, time_cost: int, memory_kib: int, threads: int, queue_max: int,
                 wait_max_s: float = 5.0) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=LANES)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2",
                                                           initializer=_lowest_priority)
        self._slots = threads + queue_max
        self._wait_max_s = wait_max_s
        self._busy = 0
        # Verified against when an email has no account, so that both cost the same time.
        self._dummy = self._hasher.hash("not a password of anyone's")

    @property
    def busy(self) -> int:
        """Hashes running or waiting."""
        return self._busy

    def check_room(self) -> None:
        """Refuses at once when no hash could start or wait now: a flood's surplus then costs
        no lookup, no count and no hash."""
        if self._busy >= self._slots:
            raise BUSY

    async def _run(self, fn, *args):
        self.check_room()
        loop = asyncio.get_running_loop()
        self._busy += 1
        future = self._pool.submit(_unless_late, time.monotonic() + self._wait_max_s, fn, *args)
        future.add_done_callback(lambda _: self._free_from_thread(loop))
        try:
            return await asyncio.wrap_future(future)
        except _Late:
            raise BUSY from None

    def _free_from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed first: nothing left to free
            loop.call_soon_threadsafe(self._free)

    def _free(self) -> None:
        self._busy -= 1

    async def hash(self, password: str) -> str:
        return await self._run(self._hasher.hash, password)

    async def matches(self, stored: str | None, password: str) -> bool:
        """Whether `password` is the one `stored` was made from; None (no account) costs the same."""
        return await self._run(self._verify, stored or self._dummy, password) and stored is not None

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _unless_late(deadline: float, fn, *args):
    if time.monotonic() > deadline:
        raise _Late()
    return fn(*args)
