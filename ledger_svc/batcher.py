"""Group commit: operations that arrive together are applied in one transaction.

A worker takes everything queued (up to a weight bound), lets a lone request
wait a moment for company, applies the batch with one call, and answers each
caller. While a transaction runs, new arrivals queue, so batches grow with
load by themselves. The queue is bounded: when it is full, submit() fails at
once (the caller answers UNAVAILABLE; Envoy turns that into a 503, never a free
call). A batch that fails is retried once, then split into single operations
so that one bad operation cannot fail its neighbours. With several workers
(PostgreSQL: one connection each), the next batch forms and starts while the
previous one waits on the database; row locks keep them consistent.
"""
import asyncio
import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full or the batcher is stopped."""


@dataclasses.dataclass(slots=True)
class _Item:
    op: Any
    weight: int
    future: asyncio.Future


Apply = Callable[[Sequence[Any]], Awaitable[Sequence[Any]]]


class Batcher:
    def __init__(self, apply: Apply, *, max_weight: int, linger_s: float, queue_max: int = 20_000,
                 retries: int = 1, workers: int = 1) -> None:
        self._apply = apply
        self._max_weight = max_weight
        self._linger_s = linger_s
        self._queue_max = queue_max
        self._retries = retries
        self._queue: collections.deque[_Item] = collections.deque()
        self._wake = asyncio.Event()
        self._workers = workers
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self.batches = 0
        self.items = 0

    async def submit(self, op: Any, weight: int = 1) -> Any:
        if self._closed:
            raise Overloaded("the ledger is stopping")
        if len(self._queue) >= self._queue_max:
            raise Overloaded("the ledger's queue is full")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(op, max(1, weight), future))
        self._wake.set()
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._run(), name=f"ledger-batcher-{i}") for i in range(self._workers)]
        return await future

    async def close(self) -> None:
        """Finishes what is queued, then stops."""
        self._closed = True
        self._wake.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks = []

    def _take(self) -> list[_Item]:
        batch, weight = [], 0
        while self._queue:
            item = self._queue[0]
            if batch and weight + item.weight > self._max_weight:
                break
            self._queue.popleft()
            if item.future.cancelled():
                continue
            batch.append(item)
            weight += item.weight
        return batch

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._linger_s and len(self._queue) == 1 and not self._closed:
                # A lone request: give the ones a millisecond behind it a chance to share its commit.
                await asyncio.sleep(self._linger_s)
            batch = self._take()
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Item]) -> None:
        self.batches += 1
        self.items += len(batch)
        error: BaseException | None = None
        for _attempt in range(self._retries + 1):
            try:
                results = await self._apply([item.op for item in batch])
            except Exception as exc:  # noqa: BLE001 - every failure is handed to the callers
                error = exc
                continue
            _answer(batch, results)
            return
        if len(batch) == 1:
            _fail(batch[0], error)
            return
        log.warning("batch failed; applying its operations one by one", extra={"size": len(batch),
                                                                             "error": repr(error)})
        for item in batch:
            try:
                results = await self._apply([item.op])
            except Exception as exc:  # noqa: BLE001
                _fail(item, exc)
            else:
                _answer([item], results)


def _answer(batch: list[_Item], results: Sequence[Any]) -> None:
    assert len(results) == len(batch)
    for item, result in zip(batch, results):
        if not item.future.done():
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)


def _fail(item: _Item, error: BaseException | None) -> None:
    if not item.future.done():
        item.future.set_exception(error or RuntimeError("batch failed"))
