"""auth_svc.passwords: argon2 on a bounded pool; beyond it, refused at once."""
import asyncio
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


async def test_hashes_beyond_the_pool_and_its_queue_are_refused_at_once():
    pool = passwords.Passwords(time_cost=1, memory_kib=1024, threads=1, queue_max=1)
    release = threading.Event()
    pool._hasher = WaitingHasher(release)
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
            await pool.hash("four")
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
    pool = passwords.Passwords(time_cost=1, memory_kib=1024, threads=1, queue_max=4, wait_max_s=0.05)
    release = threading.Event()
    pool._hasher = WaitingHasher(release)
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


async def test_passwords_match_and_hash_on_threads_of_the_lowest_priority():
    pool = passwords.Passwords(time_cost=1, memory_kib=1024, threads=1, queue_max=4)
    try:
        stored = await pool.hash("a long passphrase")
        assert await pool.matches(stored, "a long passphrase")
        assert not await pool.matches(stored, "another passphrase")
        assert not await pool.matches(None, "a long passphrase")  # no account: same work, never true
        policy = await asyncio.wrap_future(pool._pool.submit(lambda: os.sched_getscheduler(0)))
        assert policy == os.SCHED_IDLE
    finally:
        pool.close()
