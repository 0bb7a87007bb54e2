"""Exports each settled call to Lago as a usage event, in batches, from the outbox.

Events are built with lago-python-client's models (Event, BatchEvent) and
POSTed as one batch to <TOKENS_LAGO_API_URL>/api/v1/events/batch with an async
HTTP client (the library itself is synchronous). transaction_id is the call's
request id, so a batch sent again after a lost answer is deduplicated by Lago:
newer Lago versions ignore the repeats; older ones answer 422 with
"value_already_exist" for them, which counts as delivered here (the rest of
that batch is sent again at once). Other failures are retried with backoff
and given up after ATTEMPTS_MAX tries.
"""
import dataclasses
import decimal
import json
import logging
from collections.abc import Mapping, Sequence

import httpx
from lago_python_client.models import event as lago_event

from ledger_svc import domain, metrics, store as store_mod

log = logging.getLogger(__name__)

BATCH = 100
ATTEMPTS_MAX = 10
LEASE_MS = 120_000
POLL_S = 5.0
TIMEOUT_S = 10.0
_DUPLICATE = "value_already_exist"


@dataclasses.dataclass(frozen=True)
class LagoSettings:
    api_url: str
    api_key: str
    event_code: str


def cents(nanos: int) -> str:
    """Nano-dollars as an exact decimal string of US cents (1 cent = 10,000,000 nanos)."""
    text = format(decimal.Decimal(nanos).scaleb(-7), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def build_event(fields: Mapping, code: str) -> lago_event.Event:
    return lago_event.Event(
        transaction_id=fields["transaction_id"],
        external_subscription_id=fields["account_id"],
        code=code,
        timestamp=fields["event_ms"] // 1000,
        precise_total_amount_cents=cents(fields["cost_nanos"]),
        properties=json.loads(fields["properties"]),
    )


def batch_body(events: Sequence[lago_event.Event]) -> bytes:
    return json.dumps(lago_event.BatchEvent(events=list(events)).dict()).encode()


def duplicates_and_invalid(response: httpx.Response, size: int) -> tuple[set[int], set[int]] | None:
    """For a 422: (indexes Lago already has, indexes it refuses); None if the answer says neither."""
    try:
        details = response.json().get("error_details") or {}
    except (ValueError, AttributeError):
        return None
    duplicates, invalid = set(), set()
    for key, problems in details.items() if isinstance(details, dict) else ():
        if not str(key).isdigit() or int(key) >= size or not isinstance(problems, dict):
            return None
        messages = {m for values in problems.values() for m in (values if isinstance(values, list) else [values])}
        if set(problems) == {"transaction_id"} and messages == {_DUPLICATE}:
            duplicates.add(int(key))
        else:
            invalid.add(int(key))
    return (duplicates, invalid) if duplicates or invalid else None


class Exporter:
    def __init__(self, store: store_mod.SqlStore, settings: LagoSettings, clock: domain.Clock,
                 client: httpx.AsyncClient | None = None) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._client = client or httpx.AsyncClient(timeout=TIMEOUT_S)
        self._url = settings.api_url.rstrip("/").removesuffix("/api/v1") + "/api/v1/events/batch"

    async def close(self) -> None:
        await self._client.aclose()

    async def run_once(self) -> int:
        """Sends one batch of what is due; returns how many rows it handled."""
        jobs = await self._store.claim("lago", BATCH, LEASE_MS)
        if not jobs:
            return 0
        events = [build_event(job.fields, self._settings.event_code) for job in jobs]
        try:
            response = await self._client.post(self._url, content=batch_body(events), headers={
                "Authorization": f"Bearer {self._settings.api_key}", "Content-Type": "application/json"})
        except httpx.HTTPError as error:
            await self._retry(jobs, repr(error))
            return len(jobs)
        if response.is_success:
            await self._store.finish("lago", [job.id for job in jobs], sent=True)
            metrics.OUTBOX_SENT.labels(outbox="lago").inc(len(jobs))
            return len(jobs)
        verdict = duplicates_and_invalid(response, len(jobs)) if response.status_code == 422 else None
        if verdict is None:
            await self._retry(jobs, f"HTTP {response.status_code}: {response.text[:300]}")
            return len(jobs)
        duplicates, invalid = verdict
        await self._store.finish("lago", [job.id for i, job in enumerate(jobs) if i in duplicates], sent=True)
        await self._store.finish("lago", [job.id for i, job in enumerate(jobs) if i in invalid], sent=False,
                                 error=response.text[:500])
        for index in sorted(invalid):
            log.error("lago refused an event", extra={"transaction_id": jobs[index].fields["transaction_id"]})
        # The rest were refused only because a neighbour was: due again at once.
        await self._store.finish("lago", [job.id for i, job in enumerate(jobs) if i not in duplicates | invalid],
                                 sent=False, error="batch refused", retry_at_ms=self._clock())
        return len(jobs)

    async def _retry(self, jobs: Sequence[store_mod.OutboxJob], error: str) -> None:
        metrics.OUTBOX_FAILED.labels(outbox="lago").inc(len(jobs))
        log.warning("lago export failed", extra={"error": error, "events": len(jobs)})
        given_up = [job.id for job in jobs if job.attempts >= ATTEMPTS_MAX]
        await self._store.finish("lago", given_up, sent=False, error=error)
        for job in jobs:
            if job.attempts < ATTEMPTS_MAX:
                retry_at = self._clock() + store_mod.outbox_backoff_ms(job.attempts)
                await self._store.finish("lago", [job.id], sent=False, error=error, retry_at_ms=retry_at)

    async def run(self) -> None:
        try:
            await self._loop()
        finally:
            await self.close()

    async def _loop(self) -> None:
        await store_mod.drain_outbox(self.run_once, self._store.lago_ready, BATCH, POLL_S, "lago")
