"""Password hashing that cannot starve the gateway: argon2id on a bounded pool of threads.

Each hash is ~64 MiB and tens of milliseconds of one core, on purpose. Run on the event
loop, a burst of logins would stall every Check auth_svc answers; run on an unbounded
pool, it would take every core from Envoy and the other services. So hashes run on at
most `threads` threads, each lowered to the least CPU priority (Linux's nice is per
thread), so that the inference path preempts them; at most `queue_max` more wait, and a
login or signup beyond that is refused at once (503, Retry-After) instead of queueing
without end. A slot is freed when its hash ends, not when its caller leaves, so callers
who hang up cannot pile hashes up behind the bound.
"""
import asyncio
import concurrent.futures
import contextlib
import os
import threading

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from common import errors

# The nice value of the hashing threads: the lowest priority there is.
NICE = 19
BUSY = errors.Unavailable("Too many logins and signups at once; try again in a few seconds.",
                          code="server_busy", retry_after_s=1)


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)


class Passwords:
    def __init__(self, *, time_cost: int, memory_kib: int, threads: int, queue_max: int) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2",
                                                           initializer=_lower_priority)
        self._slots = threads + queue_max
        self._busy = 0
        # Verified against when an email has no account, so that both cost the same time.
        self._dummy = self._hasher.hash("not a password of anyone's")

    @property
    def busy(self) -> int:
        """Hashes running or waiting."""
        return self._busy

    async def _run(self, fn, *args):
        if self._busy >= self._slots:
            raise BUSY
        loop = asyncio.get_running_loop()
        self._busy += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: self._free_from_thread(loop))
        return await asyncio.wrap_future(future)

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
