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
here is claimed (ClaimHolds, batched), which gives its hold the full lifetime;
most calls settle before that and cost no claim at all. A call costs one dict
entry while it runs; a sweep every CLAIM_SWEEP_S finds the ones that are due.
"""
import asyncio
import itertools
import logging
import time

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


class Settler:
    def __init__(self, ledger: ledger_pb2_grpc.LedgerStub, outbox: store_mod.OutboxStore, *,
                 timeout_s: float, batch_max: int, linger_s: float,
                 queue_max: int, retry_s: float, claim_after_s: float = 5.0) -> None:
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
        # hold id -> when its call started here (time.monotonic), oldest first.
        self._running: dict[str, float] = {}
        self._claims: set[str] = set()
        self._claim_task: asyncio.Task | None = None

    def started(self, hold_id: str) -> None:
        """A call began to run under this hold: claim it unless it settles first."""
        if hold_id and hold_id not in self._running:
            self._running[hold_id] = time.monotonic()

    def claim(self, hold_id: str) -> None:
        """Claims the hold now (a video job keeps its hold while it runs elsewhere)."""
        self._running.pop(hold_id, None)
        if len(self._claims) < CLAIMS_MAX:
            self._claims.add(hold_id)
        if self._claim_task is None or self._claim_task.done():
            self._claim_task = asyncio.ensure_future(self._send_claims())

    async def _claim_loop(self) -> None:
        """Claims the holds of calls still running claim_after_s after they started."""
        running = self._running
        while True:
            await asyncio.sleep(CLAIM_SWEEP_S)
            due = time.monotonic() - self.claim_after_s
            while running:
                hold_id = next(iter(running))  # the oldest call still running
                if running[hold_id] > due:
                    break
                self.claim(hold_id)

    async def _send_claims(self) -> None:
        await asyncio.sleep(CLAIM_LINGER_S)
        while self._claims:
            batch = list(itertools.islice(self._claims, self.batch_max))
            self._claims.difference_update(batch)
            try:
                await self.ledger.ClaimHolds(ledger_pb2.ClaimHoldsRequest(hold_ids=batch), timeout=self.timeout_s,
                                             wait_for_ready=True)
                self.claimed += len(batch)
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
        self._claims.discard(settlement.hold_id)
        try:
            self.queue.put_nowait(settlement)
        except asyncio.QueueFull:
            # The ledger is far behind: keep it durable instead of holding it in memory.
            self._tasks.append(asyncio.ensure_future(self._to_outbox([settlement])))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._retry_loop()),
                       asyncio.create_task(self._claim_loop())]

    async def stop(self) -> None:
        self._running.clear()
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
