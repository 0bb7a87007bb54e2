"""Password hashing that cannot starve the gateway: argon2id in a bounded pool of processes.

Each hash is ~64 MiB and a few hundred milliseconds of one core, on purpose. Run on the
event loop, a burst of logins would stall every Check auth_svc answers; run on an
unbounded pool, it would take every core from Envoy and the other services. So hashes
run in at most `workers` processes of their own, each of Linux's SCHED_IDLE policy: a
thread of any other process that wakes up preempts a hash at once, and a core running
only hashes counts as idle when the kernel places work. (Nice would not do: with
autogroup scheduling it counts only against threads of the same session, and every
service is its own. Threads would not do either: a hashing thread at the lowest
priority that holds auth_svc's GIL when it is preempted stalls every Check behind it,
measured as +300 ms at p99 on /v1/models.) At most `queue_max` more wait, none longer
than `wait_max_s`; a login or signup beyond that is refused (503, Retry-After) instead
of queueing without end. A slot is freed when its hash ends, not when its caller
leaves, so callers who hang up cannot pile hashes up behind the bound.
"""
import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from common import errors

# argon2's lanes are threads of its own (the library's default is 4): with one lane a
# worker is one core at most, so the number of workers is the CPU hashing can take.
# Hashes made with more lanes (before) still verify: their parameters are in the hash.
LANES = 1
BUSY = errors.Unavailable("Too many logins and signups at once; try again in a few seconds.",
                          code="server_busy", retry_after_s=1)

# The hasher of a worker process, made by _start_worker.
_hasher: PasswordHasher | None = None


def _start_worker(time_cost: int, memory_kib: int) -> None:
    global _hasher
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    _hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=LANES)


class _Late(Exception):
    """A hash that waited past its deadline: its caller is told to come back instead."""


def _hash(deadline: float, password: str) -> str:
    if time.monotonic() > deadline:
        raise _Late()
    return _hasher.hash(password)


def _verify(deadline: float, stored: str, password: str) -> bool:
    if time.monotonic() > deadline:
        raise _Late()
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def process_pool(workers: int, time_cost: int, memory_kib: int) -> concurrent.futures.Executor:
    # spawn, not fork: a forked copy of a process running gRPC is not safe.
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_start_worker, initargs=(time_cost, memory_kib))


class Passwords:
    def __init__(self, *, time_cost: int, memory_kib: int, workers: int, queue_max: int,
                 wait_max_s: float = 5.0, executor: concurrent.futures.Executor | None = None) -> None:
        """`executor` runs _hash and _verify after _start_worker ran in it (tests pass threads)."""
        self._make_pool = (lambda: executor) if executor is not None else \
            (lambda: process_pool(workers, time_cost, memory_kib))
        self._pool = self._make_pool()
        self._slots = workers + queue_max
        self._wait_max_s = wait_max_s
        self._busy = 0
        # Verified against when an email has no account, so that both cost the same time.
        self._dummy = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib,
                                     parallelism=LANES).hash("not a password of anyone's")

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
        try:
            future = self._pool.submit(fn, time.monotonic() + self._wait_max_s, *args)
        except concurrent.futures.BrokenExecutor:
            self._busy -= 1
            self._renew()
            raise BUSY from None
        future.add_done_callback(lambda _: self._free_from_thread(loop))
        try:
            return await asyncio.wrap_future(future)
        except _Late:
            raise BUSY from None
        except concurrent.futures.BrokenExecutor:
            # A worker died (killed, out of memory): the pool is broken for good; a new one serves.
            self._renew()
            raise BUSY from None

    def _renew(self) -> None:
        broken, self._pool = self._pool, self._make_pool()
        broken.shutdown(wait=False, cancel_futures=True)

    def _free_from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed first: nothing left to free
            loop.call_soon_threadsafe(self._free)

    def _free(self) -> None:
        self._busy -= 1

    async def hash(self, password: str) -> str:
        return await self._run(_hash, password)

    async def matches(self, stored: str | None, password: str) -> bool:
        """Whether `password` is the one `stored` was made from; None (no account) costs the same."""
        return await self._run(_verify, stored or self._dummy, password) and stored is not None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
