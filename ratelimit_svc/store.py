"""Where windows live: Redis (shared by every replica), memory (one replica), and
the failover between them that keeps limiting while Redis is unreachable."""
import asyncio
import dataclasses
import hashlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import redis.asyncio
import redis.asyncio.cluster
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ratelimit_svc import domain, metrics, redis_pipe

log = logging.getLogger(__name__)

# Everything a Redis call can fail with: a refused or dropped connection, our
# timeout, an error reply.
REDIS_FAILURES = (redis.exceptions.RedisError, OSError, TimeoutError)

# The key's window is one sorted set: member = an id unique to the admitted
# call, score = when it was admitted (Unix ms, Redis server time). The braces
# are a cluster hash tag, so anything added per key later lands on its slot.
KEY_PREFIX = "ratelimit:v1:{"

# One atomic decision. KEYS[1] the window; ARGV: mode ("hit" admits and logs,
# "peek" only reads), limit, window_ms, member, now_ms ("" means Redis TIME,
# so replicas with different clocks agree). Returns {allowed 0|1, used,
# frees_at_ms, now_ms}; see domain.outcome for what frees_at_ms means.
SCRIPT = """
local now = tonumber(ARGV[5])
if not now then
  -- TIME is not deterministic: Redis 6 must replicate this script's effects, not the script.
  redis.replicate_commands()
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local key = KEYS[1]
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local used = redis.call('ZCARD', key)
if used < limit then
  if ARGV[1] == 'hit' then
    redis.call('ZADD', key, now, ARGV[4])
    redis.call('PEXPIRE', key, window)
    used = used + 1
  end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if oldest[2] then
    return {1, used, tonumber(oldest[2]) + window, now}
  end
  return {1, used, now, now}
end
local nth = redis.call('ZRANGE', key, used - limit, used - limit, 'WITHSCORES')
return {0, used, tonumber(nth[2]) + window, now}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
_pack_evalsha = redis_pipe.packer("EVALSHA", SCRIPT_SHA, 1)

# Copying memory windows back into Redis: entries per pipeline, and its time bound.
RESTORE_BATCH = 2048
RESTORE_TIMEOUT_S = 1.0


@dataclasses.dataclass(frozen=True)
class Receipt:
    """An admitted call, enough to take it back: its window, its member in Redis ("" when it
    was admitted in memory) and its time."""
    key_id: str
    member: str
    at_ms: int


class WindowStore(Protocol):
    """What the service needs from a place that keeps windows."""

    @property
    def backend(self) -> str:
        """"redis" or "memory": where the next decision is made."""

    async def hit(self, key_id: str, limit: int, now_ms: int | None = None,
                  window_ms: int = domain.WINDOW_MS) -> domain.Decision:
        """Decides one call for `key_id` at `limit`, logging it if admitted."""

    async def take(self, key_id: str, limit: int, window_ms: int) -> tuple[domain.Decision, Receipt | None]:
        """hit(), with a receipt for release() when admitted."""

    async def release(self, receipt: Receipt) -> None:
        """Takes an admitted call back out of its window."""

    async def peek(self, key_id: str, limit: int, now_ms: int | None = None) -> domain.Decision:
        """The window as it stands, logging nothing."""

    async def close(self) -> None: ...


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def window_key(key_id: str) -> str:
    return KEY_PREFIX + key_id + "}"


class MemoryWindowStore:
    """Windows of this replica only: the degraded mode, and a fake for tests."""

    backend = "memory"

    def __init__(self, clock: domain.Clock = domain.system_clock, *, keys_max: int = 100_000) -> None:
        self.windows = domain.Windows(clock, keys_max=keys_max)

    async def hit(self, key_id: str, limit: int, now_ms: int | None = None,
                  window_ms: int = domain.WINDOW_MS) -> domain.Decision:
        return self.windows.hit(key_id, limit, now_ms, window_ms)

    async def take(self, key_id: str, limit: int, window_ms: int) -> tuple[domain.Decision, Receipt | None]:
        decision = self.windows.hit(key_id, limit, None, window_ms)
        return decision, Receipt(key_id, "", decision.at_ms) if decision.allowed else None

    async def release(self, receipt: Receipt) -> None:
        self.windows.remove(receipt.key_id, receipt.at_ms)

    async def peek(self, key_id: str, limit: int, now_ms: int | None = None) -> domain.Decision:
        return self.windows.peek(key_id, limit, now_ms)

    async def close(self) -> None:
        self.windows.clear()


def connect(url: str, *, cluster: bool, timeout_s: float, connections_max: int):
    """A redis.asyncio client whose every wait (connect, pool, reply) is bounded
    by `timeout_s` and which never retries on its own: the failover decides."""
    bounds = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                  retry=Retry(NoBackoff(), 0), health_check_interval=0)
    if cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(url, max_connections=connections_max, **bounds)
    # Blocking: a burst waits (bounded) for a free connection instead of failing
    # with "too many connections" and tripping the breaker on our own load.
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=connections_max, timeout=timeout_s, **bounds)
    return redis.asyncio.Redis(connection_pool=pool)


def open_redis(url: str, *, cluster: bool, timeout_s: float, connections_max: int) -> "RedisWindowStore":
    """The Redis store as the service runs it: decisions over a pipelined connection
    (redis.asyncio's cluster client with a cluster), the rest over a pool."""
    client = connect(url, cluster=cluster, timeout_s=timeout_s, connections_max=connections_max)
    pipe = None if cluster else redis_pipe.RedisPipe(url, timeout_s=timeout_s)
    return RedisWindowStore(client, timeout_s=timeout_s, pipe=pipe)


class RedisWindowStore:
    """Windows in Redis: exact across replicas, one EVALSHA round trip per decision.

    Decisions go over `pipe` (one pipelined connection, see redis_pipe) when
    given, else through `client` (Redis Cluster: redis-py routes by key slot);
    everything else goes through `client`.
    """

    backend = "redis"

    def __init__(self, client, *, timeout_s: float, pipe: redis_pipe.RedisPipe | None = None,
                 window_ms: int = domain.WINDOW_MS) -> None:
        self._client = client
        self._pipe = pipe
        self._timeout_s = timeout_s
        self._window_ms = window_ms
        # Members must be unique across replicas: a random replica id and a counter.
        self._replica = os.urandom(6).hex()
        self._seq = itertools.count()

    async def hit(self, key_id: str, limit: int, now_ms: int | None = None,
                  window_ms: int = domain.WINDOW_MS) -> domain.Decision:
        member = f"{self._replica}:{next(self._seq)}"
        return await self._decide(key_id, "hit", limit, member, now_ms, window_ms)

    async def take(self, key_id: str, limit: int, window_ms: int) -> tuple[domain.Decision, Receipt | None]:
        member = f"{self._replica}:{next(self._seq)}"
        decision = await self._decide(key_id, "hit", limit, member, None, window_ms)
        return decision, Receipt(key_id, member, decision.at_ms) if decision.allowed else None

    async def release(self, receipt: Receipt) -> None:
        async with asyncio.timeout(self._timeout_s):
            await self._client.zrem(window_key(receipt.key_id), receipt.member)

    async def peek(self, key_id: str, limit: int, now_ms: int | None = None) -> domain.Decision:
        return await self._decide(key_id, "peek", limit, "", now_ms, self._window_ms)

    async def _decide(self, key_id: str, mode: str, limit: int, member: str,
                      now_ms: int | None, window_ms: int) -> domain.Decision:
        args = (window_key(key_id), mode, limit, window_ms, member, "" if now_ms is None else now_ms)
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    allowed, used, frees_at_ms, now = await self._evalsha(args)
                except redis.exceptions.NoScriptError:
                    # A restarted or failed-over Redis has lost its script cache.
                    await self._client.script_load(SCRIPT)
                    allowed, used, frees_at_ms, now = await self._evalsha(args)
        except TimeoutError:
            if self._pipe is not None:
                self._pipe.reset()
            raise
        return domain.outcome(allowed=allowed == 1, used=used, limit=limit,
                              frees_at_ms=frees_at_ms, now_ms=now, window_ms=window_ms)

    def _evalsha(self, args: tuple):
        if self._pipe is not None:
            return self._pipe.send(_pack_evalsha(args))
        return self._client.evalsha(SCRIPT_SHA, 1, *args)

    async def load(self) -> None:
        """Loads the script: a probe that Redis answers and will know the script."""
        async with asyncio.timeout(self._timeout_s):
            await self._client.script_load(SCRIPT)

    async def time_ms(self) -> int:
        async with asyncio.timeout(self._timeout_s):
            seconds, micros = await self._client.time()
        return seconds * 1000 + micros // 1000

    async def restore(self, windows: Iterable[tuple[str, list[int], int]], *, offset_ms: int) -> int:
        """Adds admissions made elsewhere (memory, while Redis was away) to the
        windows, shifted by `offset_ms` onto Redis time. Members are derived from
        the time and rank, so copying the same admission twice adds it once.
        Returns the number of admissions sent."""
        sent = 0
        pipe = self._client.pipeline(transaction=False)
        batched = 0
        for key_id, times_ms, window_ms in windows:
            members: dict[str, int] = {}
            for at_ms, group in itertools.groupby(times_ms):
                for nth, _ in enumerate(group):
                    members[f"{self._replica}:m:{at_ms}:{nth}"] = at_ms + offset_ms
            key = window_key(key_id)
            pipe.zadd(key, members)
            pipe.pexpire(key, window_ms)
            batched += len(members)
            sent += len(members)
            if batched >= RESTORE_BATCH:
                await self._execute_restore(pipe)
                pipe = self._client.pipeline(transaction=False)
                batched = 0
        if batched:
            await self._execute_restore(pipe)
        return sent

    async def _execute_restore(self, pipe) -> None:
        async with asyncio.timeout(max(RESTORE_TIMEOUT_S, self._timeout_s)):
            await pipe.execute()

    async def close(self) -> None:
        if self._pipe is not None:
            await self._pipe.close()
        if isinstance(self._client, redis.asyncio.Redis):
            # The pool was made by connect(), so closing the client must close it too.
            await self._client.aclose(close_connection_pool=True)
        else:
            await self._client.aclose()


Listener = Callable[[bool], Awaitable[None]]


class FailoverWindowStore:
    """Redis while it answers; this replica's memory while it does not.

    A circuit breaker: the first failed Redis call switches every later decision
    to memory at once (so a dead Redis does not add its timeout to each call),
    and a background probe tries Redis every `probe_s`. When a probe succeeds the
    admissions made in memory that are still inside the window are copied into
    Redis, then decisions go back to Redis. Degraded, each replica limits on its
    own: never everything refused, never unlimited, at most `limit` per replica.
    """

    def __init__(self, primary: RedisWindowStore, fallback: MemoryWindowStore, *,
                 probe_s: float, clock: domain.Clock = domain.system_clock) -> None:
        self._redis = primary
        self._memory = fallback
        self._probe_s = probe_s
        self._clock = clock
        self._degraded = False
        self._probe: asyncio.Task | None = None
        self._listeners: list[Listener] = []

    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def backend(self) -> str:
        return "memory" if self._degraded else "redis"

    def listen(self, listener: Listener) -> None:
        """`listener(degraded)` is awaited at start() and on every transition."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Tries Redis once; unreachable, the service starts degraded and keeps probing."""
        try:
            await self._redis.load()
        except REDIS_FAILURES as error:
            metrics.REDIS_ERRORS.inc()
            await self._trip(error)
        else:
            await self._announce()

    async def hit(self, key_id: str, limit: int, now_ms: int | None = None,
                  window_ms: int = domain.WINDOW_MS) -> domain.Decision:
        if not self._degraded:
            try:
                return await self._redis.hit(key_id, limit, now_ms, window_ms)
            except REDIS_FAILURES as error:
                metrics.REDIS_ERRORS.inc()
                await self._trip(error)
        return self._memory.windows.hit(key_id, limit, now_ms, window_ms)

    async def take(self, key_id: str, limit: int, window_ms: int) -> tuple[domain.Decision, Receipt | None]:
        if not self._degraded:
            try:
                return await self._redis.take(key_id, limit, window_ms)
            except REDIS_FAILURES as error:
                metrics.REDIS_ERRORS.inc()
                await self._trip(error)
        return await self._memory.take(key_id, limit, window_ms)

    async def release(self, receipt: Receipt) -> None:
        """Best effort: a call that cannot be taken back keeps counting, which errs on the safe side."""
        if not receipt.member:
            await self._memory.release(receipt)
            return
        if self._degraded:
            return
        try:
            await self._redis.release(receipt)
        except REDIS_FAILURES as error:
            metrics.REDIS_ERRORS.inc()
            await self._trip(error)

    async def peek(self, key_id: str, limit: int, now_ms: int | None = None) -> domain.Decision:
        if not self._degraded:
            try:
                return await self._redis.peek(key_id, limit, now_ms)
            except REDIS_FAILURES as error:
                metrics.REDIS_ERRORS.inc()
                await self._trip(error)
        return self._memory.windows.peek(key_id, limit, now_ms)

    async def _trip(self, error: BaseException) -> None:
        if self._degraded:
            return
        self._degraded = True
        metrics.DEGRADED.set(1)
        log.warning("redis unreachable: limiting from this replica's memory until it answers again",
                    extra={"error": _describe(error), "probe_s": self._probe_s})
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())
        await self._announce()

    async def _probe_until_back(self) -> None:
        while True:
            await asyncio.sleep(self._probe_s)
            try:
                await self._redis.load()
                offset_ms = await self._redis.time_ms() - self._clock()
                copied = await self._redis.restore(self._memory.windows.snapshot(), offset_ms=offset_ms)
            except REDIS_FAILURES as error:
                metrics.REDIS_ERRORS.inc()
                log.debug("redis probe failed", extra={"error": _describe(error)})
                continue
            except Exception:
                # A bug here must not leave the replica degraded for good.
                log.exception("redis probe crashed; probing again")
                continue
            await self._recover(offset_ms, copied)
            return

    async def _recover(self, offset_ms: int, copied: int) -> None:
        # No await between taking the last memory admissions and switching back,
        # so none is lost; what the first copy already sent is not doubled.
        late = self._memory.windows.snapshot()
        self._memory.windows.clear()
        self._degraded = False
        self._probe = None
        metrics.DEGRADED.set(0)
        try:
            await self._redis.restore(late, offset_ms=offset_ms)
        except REDIS_FAILURES as error:
            # Redis went away again at once: the next decision trips the breaker.
            metrics.REDIS_ERRORS.inc()
            log.debug("copying the last memory admissions failed", extra={"error": _describe(error)})
        log.warning("redis reachable again: limiting from redis",
                    extra={"copied_admissions": copied, "offset_ms": offset_ms})
        await self._announce()

    async def _announce(self) -> None:
        for listener in self._listeners:
            try:
                await listener(self._degraded)
            except Exception:
                log.exception("a redis state listener failed")

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            try:
                await probe
            except asyncio.CancelledError:
                pass
        await self._redis.close()
