"""auth_svc.passwords: argon2 in a bounded pool; beyond it, or waiting too long, refused."""
import asyncio
import concurrent.futures
import os
import threading

import pytest

from auth_svc import passwords
from common import errors


class WaitingHasher:
    """A hash that waits for the test to let it finish."""

    def __init__(self, release: threading.Event) -> None:
        self._release = release

    def hash(self, password: str) -> str:
        self._release.wait(10)
        return "hashed"


def waiting_pool(release: threading.Event, **bounds) -> passwords.Passwords:
    """A pool whose one worker (a thread here) hashes only when `release` is set."""
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, initializer=lambda: setattr(passwords, "_hasher", WaitingHasher(release)))
    return passwords.Passwords(time_cost=1, memory_kib=1024, workers=1, executor=executor, **bounds)


async def test_hashes_beyond_the_pool_and_its_queue_are_refused_at_once():
    release = threading.Event()
    pool = waiting_pool(release, queue_max=1)
    try:
        running = asyncio.ensure_future(pool.hash("one"))
        queued = asyncio.ensure_future(pool.hash("two"))
        await asyncio.sleep(0)
        assert pool.busy == 2
        with pytest.raises(errors.Unavailable) as busy:
            await pool.hash("three")
        assert busy.value.code == "server_busy" and busy.value.retry_after_s == 1
        # A caller who leaves does not free its slot while its hash still runs.
        queued.cancel()
        await asyncio.sleep(0)
        with pytest.raises(errors.Unavailable):
            pool.check_room()
        release.set()
        assert await running == "hashed"
        for _ in range(100):
            if pool.busy == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.busy == 0
    finally:
        release.set()
        pool.close()


async def test_a_hash_that_waited_too_long_is_refused_not_computed():
    release = threading.Event()
    pool = waiting_pool(release, queue_max=4, wait_max_s=0.05)
    try:
        first = asyncio.ensure_future(pool.hash("one"))
        late = asyncio.ensure_future(pool.hash("two"))
        await asyncio.sleep(0.2)  # the second waits past its deadline behind the first
        release.set()
        assert await first == "hashed"
        with pytest.raises(errors.Unavailable):
            await late
    finally:
        release.set()
        pool.close()


async def test_passwords_match_in_worker_processes_of_the_lowest_priority():
    pool = passwords.Passwords(time_cost=1, memory_kib=1024, workers=1, queue_max=4)
    try:
        stored = await pool.hash("a long passphrase")
        assert await pool.matches(stored, "a long passphrase")
        assert not await pool.matches(stored, "another passphrase")
        assert not await pool.matches(None, "a long passphrase")  # no account: same work, never true
        assert "p=1" in stored  # one lane: a worker is one core at most
        worker = await asyncio.wrap_future(pool._pool.submit(_policy_and_pid))
        assert worker == (os.SCHED_IDLE, worker[1]) and worker[1] != os.getpid()
    finally:
        pool.close()


async def test_a_dead_worker_is_replaced():
    pool = passwords.Passwords(time_cost=1, memory_kib=1024, workers=1, queue_max=4)
    try:
        assert await pool.hash("a long passphrase")
        with pytest.raises(concurrent.futures.BrokenExecutor):
            await asyncio.wrap_future(pool._pool.submit(os._exit, 1))
        with pytest.raises(errors.Unavailable):  # the broken pool answers once, and is renewed
            await pool.hash("a long passphrase")
        assert await pool.matches(await pool.hash("again"), "again")
    finally:
        pool.close()


def _policy_and_pid() -> tuple[int, int]:
    return os.sched_getscheduler(0), os.getpid()
