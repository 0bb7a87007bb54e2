"""Settling calls with ledger_svc: batched, and never lost while it is away.

Every call ends with one Settlement (its hold id and the units it consumed).
They are sent in batches (one RPC per few milliseconds under load). What the
ledger cannot take right now goes to the SQL outbox and is retried with
backoff until it is confirmed; ledger_svc makes a repeated settlement a no-op,
so a retry never charges twice. On shutdown the queue is flushed (to the
ledger, or else to the outbox) before the process exits.
"""
import asyncio
import logging

import grpc

from common import clients
from router_svc import store as store_mod
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger(__name__)

# What the ledger answered for a settlement is final: done, or a refusal that a
# retry cannot change. Only settlements it never answered are retried.
_DONE = frozenset({"posted", "voided", "duplicate"})


class Settler:
    def __init__(self, ledger: ledger_pb2_grpc.LedgerStub, outbox: store_mod.OutboxStore, *,
                 internal_token: str, timeout_s: float, batch_max: int, linger_s: float,
                 queue_max: int, retry_s: float) -> None:
        self.ledger = ledger
        self.outbox = outbox
        self.metadata = clients.metadata(internal_token)
        self.timeout_s = timeout_s
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.retry_s = retry_s
        self.queue: asyncio.Queue[ledger_pb2.Settlement] = asyncio.Queue(maxsize=queue_max)
        self.sent = 0
        self.outboxed = 0
        self._tasks: list[asyncio.Task] = []

    def submit(self, settlement: ledger_pb2.Settlement) -> None:
        try:
            self.queue.put_nowait(settlement)
        except asyncio.QueueFull:
            # The ledger is far behind: keep it durable instead of holding it in memory.
            self._tasks.append(asyncio.ensure_future(self._to_outbox([settlement])))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._retry_loop())]

    async def stop(self) -> None:
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
                                                timeout=self.timeout_s, metadata=self.metadata,
                                                wait_for_ready=True)
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
                                                timeout=self.timeout_s, metadata=self.metadata,
                                                wait_for_ready=True)
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
