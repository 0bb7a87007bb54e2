"""Settling calls with ledger_svc: batched, and never lost while it is away.

Every call ends with one Settlement (its hold id and the units it consumed).
They are sent in batches (one RPC per few milliseconds under load). What the
ledger cannot take right now goes to the SQL outbox and is retried with
backoff until it is confirmed; ledger_svc makes a repeated settlement a no-op,
so a retry never charges twice. On shutdown the queue is flushed (to the
ledger, or else to the outbox) before the process exits.

Claims: ledger_svc gives a new hold a short lifetime (TOKENS_HOLD_CLAIM_S), so
the hold of a call that never reached a router (its client left on the way)
soon stops holding credit. A call still running claim_after_s after it started
here is claimed (ClaimHolds, batched), which keeps its hold for the full
lifetime (TOKENS_HOLD_TTL_S) from then; most calls settle before that and cost
no claim at all. A call still running renew_every_s (a third of that lifetime)
after its last claim is claimed again, so a long stream never runs on a lapsed
hold. A call costs a few dict entries while it runs; a sweep every CLAIM_SWEEP_S
finds the claims that are due. safe_until says until when a running call's hold
surely holds (SAFE_SHARE of the lifetime the ledger last confirmed): a stream
still running then is ended (router_svc.server), which only happens when the
ledger has taken none of its claims for that long.

Calls whose client left before a non-streamed answer are finished by a task of
their own (detach) that settles them; stop() gives those a bounded time first.
"""
import asyncio
import itertools
import logging
import math
import time
from collections.abc import Coroutine

import grpc

from router_svc import store as store_mod
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger(__name__)

# What the ledger answered for a settlement is final: done, or a refusal that a
# retry cannot change. Only settlements it never answered are retried.
_DONE = frozenset({"posted", "voided", "duplicate"})


_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED})
# Claims that came due within this are sent in one RPC.
CLAIM_LINGER_S = 0.1
# How often running calls are checked for claims that came due (a claim comes at most this late).
CLAIM_SWEEP_S = 0.25
# Claims kept for a retry while the ledger is away, at most (each is a hold id).
CLAIMS_MAX = 100_000
# The share of a hold's lifetime, from a claim the ledger took, that a call may count on:
# the rest is margin for the claim's own trip and the ledger's expiry sweep.
SAFE_SHARE = 0.8


class Settler:
    def __init__(self, ledger: ledger_pb2_grpc.LedgerStub, outbox: store_mod.OutboxStore, *,
                 timeout_s: float, batch_max: int, linger_s: float,
                 queue_max: int, retry_s: float, claim_after_s: float = 5.0, hold_ttl_s: float = 900.0,
                 hold_claim_s: float = 60.0) -> None:
        self.ledger = ledger
        self.outbox = outbox
        self.timeout_s = timeout_s
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.retry_s = retry_s
        self.queue: asyncio.Queue[ledger_pb2.Settlement] = asyncio.Queue(maxsize=queue_max)
        self.sent = 0
        self.outboxed = 0
        self.claimed = 0
        self._tasks: list[asyncio.Task] = []
        self.claim_after_s = claim_after_s
        self.hold_ttl_s = hold_ttl_s
        self.hold_claim_s = hold_claim_s
        self.renew_every_s = hold_ttl_s / 3
        # hold id -> when its call started here (time.monotonic), oldest first: not claimed yet.
        self._running: dict[str, float] = {}
        # hold id -> when its last claim was sent, oldest first: claimed, renewed when due.
        self._renewing: dict[str, float] = {}
        # hold id -> until when its hold surely holds (time.monotonic), for every running call.
        self._safe: dict[str, float] = {}
        self._claims: set[str] = set()
        self._claim_task: asyncio.Task | None = None
        self._detached: set[asyncio.Task] = set()

    def started(self, hold_id: str) -> None:
        """A call began to run under this hold: claim it unless it settles first."""
        if hold_id and hold_id not in self._safe:
            now = time.monotonic()
            self._running[hold_id] = now
            self._safe[hold_id] = now + SAFE_SHARE * self.hold_claim_s

    def safe_until(self, hold_id: str) -> float:
        """Until when (time.monotonic()) the hold of a running call surely holds; inf when
        this settler does not follow it (no hold, or a call already settled)."""
        return self._safe.get(hold_id, math.inf)

    def claim(self, hold_id: str) -> None:
        """Claims the hold now (a video job keeps its hold while it runs elsewhere)."""
        self._running.pop(hold_id, None)
        if len(self._claims) < CLAIMS_MAX:
            self._claims.add(hold_id)
        if self._claim_task is None or self._claim_task.done():
            self._claim_task = asyncio.ensure_future(self._send_claims())

    async def _claim_loop(self) -> None:
        """Claims the holds of calls still running claim_after_s after they started, and
        again every renew_every_s while they run."""
        running, renewing = self._running, self._renewing
        while True:
            await asyncio.sleep(CLAIM_SWEEP_S)
            now = time.monotonic()
            for calls, after_s in ((running, self.claim_after_s), (renewing, self.renew_every_s)):
                due = now - after_s
                while calls:  # ends: each pass moves the oldest entry to the end, stamped now
                    hold_id = next(iter(calls))
                    if calls[hold_id] > due:
                        break
                    del calls[hold_id]
                    renewing[hold_id] = now
                    self.claim(hold_id)

    async def _send_claims(self) -> None:
        await asyncio.sleep(CLAIM_LINGER_S)
        while self._claims:
            batch = list(itertools.islice(self._claims, self.batch_max))
            self._claims.difference_update(batch)
            sent = time.monotonic()
            try:
                await self.ledger.ClaimHolds(ledger_pb2.ClaimHoldsRequest(hold_ids=batch), timeout=self.timeout_s,
                                             wait_for_ready=True)
                self.claimed += len(batch)
                safe = sent + SAFE_SHARE * self.hold_ttl_s
                for hold_id in batch:
                    if hold_id in self._safe:
                        self._safe[hold_id] = max(self._safe[hold_id], safe)
            except grpc.aio.AioRpcError as error:
                # The holds keep their short lifetime until the ledger is back; a settlement
                # that comes after one lapsed still posts its charge.
                retry = error.code() in _TRANSIENT
                log.warning("ledger did not take claims", extra={"count": len(batch), "grpc": error.code().name,
                                                                 "retry": retry})
                if retry:
                    self._claims.update(batch[:max(0, CLAIMS_MAX - len(self._claims))])
                    await asyncio.sleep(self.retry_s)

    def submit(self, settlement: ledger_pb2.Settlement) -> None:
        self._running.pop(settlement.hold_id, None)
        self._renewing.pop(settlement.hold_id, None)
        self._safe.pop(settlement.hold_id, None)
        self._claims.discard(settlement.hold_id)
        try:
            self.queue.put_nowait(settlement)
        except asyncio.QueueFull:
            # The ledger is far behind: keep it durable instead of holding it in memory.
            self._tasks.append(asyncio.ensure_future(self._to_outbox([settlement])))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._retry_loop()),
                       asyncio.create_task(self._claim_loop())]

    def detach(self, finish: Coroutine) -> None:
        """Runs `finish` (which settles a call) on its own; stop() waits for it, within a bound."""
        task = asyncio.ensure_future(finish)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def stop(self, detached_s: float = 10.0) -> None:
        """Lets detached calls finish (cancelled after `detached_s`: they settle as they end),
        then sends what is queued (to the ledger, or else to the outbox)."""
        if self._detached:
            _done, pending = await asyncio.wait(set(self._detached), timeout=detached_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._running.clear()
        self._renewing.clear()
        self._safe.clear()
        if self._claim_task is not None:
            self._tasks.append(self._claim_task)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        batch = []
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        for start in range(0, len(batch), self.batch_max):
            await self._send(batch[start:start + self.batch_max])

    async def _send_loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            if self.linger_s:
                await asyncio.sleep(self.linger_s)
            while len(batch) < self.batch_max and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            await self._send(batch)

    async def _send(self, batch: list[ledger_pb2.Settlement]) -> None:
        try:
            response = await self.ledger.Settle(ledger_pb2.SettleRequest(settlements=batch),
                                                timeout=self.timeout_s, wait_for_ready=True)
        except grpc.aio.AioRpcError as error:
            log.warning("ledger did not take settlements; keeping them in the outbox",
                        extra={"count": len(batch), "grpc": error.code().name})
            await self._to_outbox(batch)
            return
        self.sent += len(batch)
        _log_refusals(response)
        answered = {r.hold_id for r in response.results}
        unanswered = [s for s in batch if s.hold_id not in answered]
        if unanswered:
            await self._to_outbox(unanswered)

    async def _to_outbox(self, batch: list[ledger_pb2.Settlement]) -> None:
        try:
            await self.outbox.put([(s.hold_id, s.SerializeToString()) for s in batch])
            self.outboxed += len(batch)
        except Exception:
            log.exception("could not write settlements to the outbox",
                          extra={"holds": [s.hold_id for s in batch]})

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            try:
                await self.retry_outbox()
            except Exception:
                log.exception("outbox retry failed")

    async def retry_outbox(self) -> int:
        """Sends what waits in the outbox; returns how many were confirmed."""
        rows = await self.outbox.due(self.batch_max)
        if not rows:
            return 0
        batch = [ledger_pb2.Settlement.FromString(payload) for _hold, payload, _attempts in rows]
        try:
            response = await self.ledger.Settle(ledger_pb2.SettleRequest(settlements=batch),
                                                timeout=self.timeout_s, wait_for_ready=True)
        except grpc.aio.AioRpcError:
            await self.outbox.retry_later([h for h, _p, _a in rows], max(a for _h, _p, a in rows))
            return 0
        _log_refusals(response)
        confirmed = [r.hold_id for r in response.results]
        await self.outbox.done(confirmed)
        if confirmed:
            log.info("settled from the outbox", extra={"count": len(confirmed)})
        return len(confirmed)


def _log_refusals(response: ledger_pb2.SettleResponse) -> None:
    for result in response.results:
        if result.status not in _DONE:
            log.error("settlement refused by the ledger", extra={"hold": result.hold_id, "status": result.status})
