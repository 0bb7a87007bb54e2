"""Video jobs (OpenAI's video API): created on a backend, followed by the router, charged once.

Lifecycle. POST /v1/videos validates the request, creates the job on a backend (the
next in turn; another only when one cannot be reached) and stores it under a gateway
id: owner, backend and backend job id, hold id, price snapshot, requested seconds,
status. The hold (taken by ledger_svc for the requested seconds) stays pending while
the job runs. A poller follows unfinished jobs (every video_poll_s, at most
video_poll_concurrency backend calls at once); GET /v1/videos/{id} also follows the
job before answering. When the backend reports `completed`, the job is charged the
seconds it produced (never more than requested); `failed`, a job the backend lost,
or one not finished within video_job_timeout_s (which is kept below ledger_svc's hold
lifetime) voids the hold. Ending the job and queueing its settlement in the outbox
happen in one transaction, and only for the first poll that sees the end, so a job
is settled exactly once even with several router replicas.

Only the account that created a job can see it or its content; anyone else gets 404.
"""
import asyncio
import json
import logging
import os
import time

import aiohttp
from google.api import httpbody_pb2

from common import catalog, errors, money, pricing
from router_svc import backends as backends_mod, domain, media, media_calls, metrics, store as store_mod
from tokens.ledger.v1 import ledger_pb2

log = logging.getLogger(__name__)

POLL_AFTER_HEADER = "openai-poll-after-ms"
# A job's status is a small JSON answer: a backend that takes longer is asked again later.
STATUS_TIMEOUT_S = 10.0


def _seconds(value) -> float:
    """A job's seconds as the backend reported them (0 when it did not say)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _not_found(video_id: str) -> errors.NotFound:
    return errors.NotFound(f"Video with id '{errors.echo(video_id)}' not found.", param="video_id", code="video_not_found")


class Videos:
    def __init__(self, settings, catalog_: catalog.Catalog, backends: backends_mod.Backends,
                 store: store_mod.VideoStore | None) -> None:
        self.settings = settings
        self.catalog = catalog_
        self.backends = backends
        self.store = store
        self._slots = asyncio.Semaphore(settings.video_poll_concurrency)
        self._task: asyncio.Task | None = None

    def _store(self) -> store_mod.VideoStore:
        if self.store is None:
            raise errors.Unavailable("video jobs are not available on this server", code="videos_unavailable")
        return self.store

    # Creating

    async def create(self, request, context, settle, claim) -> httpbody_pb2.HttpBody:
        call = media_calls.begin(context, self.settings.allow_unheld_for_benchmarks)
        kept = False
        try:
            store = self._store()
            form = media.read_form(request.content_type, request.data)
            model = domain.model_for(self.catalog, media.form_model(form), "video")
            ask = media.video_request(form, model)
            media.within_hold(call.held, model.id, "video_ms", ask.seconds * 1000)
            try:
                backend, response = await self.backends.post(model, "/videos", call.request_id,
                                                              body=ask.backend_body())
                async with response:
                    job = await response.json(content_type=None)
                backend_job_id = str(job["id"])
            except (backends_mod.BackendFailed, aiohttp.ClientError, TimeoutError, ValueError, KeyError,
                    TypeError) as failure:
                raise media_calls.unavailable(model.id, failure) from None
            now = time.time()
            row = {"id": "video_" + os.urandom(16).hex(), "account_id": call.account_id, "model": model.id,
                   "backend_url": backend.url, "backend_job_id": backend_job_id, "hold_id": call.hold_id,
                   "prices": pricing.encode_header(call.prices), "request_id": call.request_id[:200],
                   "seconds": ask.seconds, "size": ask.size, "prompt": ask.prompt,
                   "status": job.get("status") if job.get("status") in store_mod.UNFINISHED else "queued",
                   "progress": int(job.get("progress") or 0), "error": None, "produced_ms": 0,
                   "created_at": int(now), "completed_at": None,
                   "deadline_at": now + self.settings.video_job_timeout_s,
                   "next_poll_at": now + self.settings.video_poll_s}
            await store.insert(row)
            # From here the poller settles the hold, when the job ends; until then it
            # must not lapse as a call that never reached a router would.
            kept = True
            if call.hold_id:
                claim(call.hold_id)
            await context.send_initial_metadata(((POLL_AFTER_HEADER, str(int(self.settings.video_poll_s * 1000))),))
            return httpbody_pb2.HttpBody(content_type="application/json", data=media_calls.dumps(
                media.video_json(row)))
        finally:
            if not kept:
                settle(call)

    # Reading

    async def _owned(self, video_id: str, context) -> dict:
        row = await self._store().get(video_id) if video_id else None
        if row is None or row["account_id"] != media_calls.account_of(context):
            raise _not_found(video_id)
        return row

    async def retrieve(self, request, context) -> httpbody_pb2.HttpBody:
        row = await self._owned(request.video_id, context)
        if row["status"] in store_mod.UNFINISHED:
            async with self._slots:
                row = await self.follow(row)
        metadata = []
        if row["status"] in store_mod.UNFINISHED:
            metadata.append((POLL_AFTER_HEADER, str(int(self.settings.video_poll_s * 1000))))
        elif row["status"] == "completed":
            cost = pricing.cost_nanos(pricing.decode_header(row["prices"]), {"video_ms": row["produced_ms"]})
            metadata.append((media_calls.COST_HEADER, money.usd(cost)))
        await context.send_initial_metadata(tuple(metadata))
        return httpbody_pb2.HttpBody(content_type="application/json", data=media_calls.dumps(media.video_json(row)))

    async def content(self, request, context):
        """The MP4 of a completed job, streamed from its backend."""
        row = await self._owned(request.video_id, context)
        if request.variant not in ("", "video"):
            raise errors.InvalidRequest("Only variant 'video' is available.", param="variant", code="invalid_value")
        if row["status"] in store_mod.UNFINISHED:
            async with self._slots:
                row = await self.follow(row)
        if row["status"] != "completed":
            raise errors.NotFound(f"Video '{row['id']}' has no content: its status is {row['status']}.",
                                  param="video_id", code="video_not_ready")
        try:
            response = await self.backends.get(self._backend(row), f"/videos/{row['backend_job_id']}/content",
                                               row["request_id"])
        except backends_mod.BackendFailed as failure:
            raise media_calls.unavailable(row["model"], failure) from None
        async with response:
            if response.status != 200:
                raise errors.NotFound(f"The content of video '{row['id']}' is no longer available.",
                                      param="video_id", code="video_expired")
            first = True
            try:
                async for chunk in response.content.iter_chunked(media_calls.CHUNK_BYTES):
                    yield httpbody_pb2.HttpBody(content_type="video/mp4" if first else "", data=chunk)
                    first = False
            except (aiohttp.ClientError, TimeoutError) as error:
                raise media_calls.unavailable(row["model"], error) from None

    # Following

    def _backend(self, row: dict) -> catalog.Backend:
        model = self.catalog.get(row["model"])
        for backend in model.backends if model else ():
            if backend.url == row["backend_url"]:
                return backend
        return catalog.Backend(url=row["backend_url"], model=row["model"])

    async def follow(self, row: dict) -> dict:
        """Asks the job's backend where it stands and records it; the job as it now is."""
        now = time.time()
        if now >= row["deadline_at"]:
            return await self._end(row, "failed", {"code": "video_generation_timeout", "message": (
                f"The video was not ready within {self.settings.video_job_timeout_s:g} s.")})
        try:
            response = await self.backends.get(self._backend(row), f"/videos/{row['backend_job_id']}",
                                               row["request_id"], timeout_s=STATUS_TIMEOUT_S)
            async with response:
                if response.status == 404:
                    return await self._end(row, "failed", {"code": "video_not_found",
                                                           "message": "The model backend lost the job."})
                job = await response.json(content_type=None) if response.status == 200 else None
        except (backends_mod.BackendFailed, aiohttp.ClientError, TimeoutError, ValueError) as failure:
            log.info("video backend unreachable; will retry", extra={"video": row["id"], "why": str(failure)})
            job = None
        if not isinstance(job, dict):
            return await self._later(row, row["status"], row["progress"])
        status = job.get("status")
        if status == "completed":
            produced_ms = media.produced_ms(job, row["seconds"])
            if _seconds(job.get("seconds")) > row["seconds"]:
                # Charged for the seconds asked for (and held), never the backend's more.
                metrics.overran(row["backend_url"], row["model"], ["video_ms"], video=row["id"],
                                asked_s=row["seconds"], reported_s=job.get("seconds"))
            return await self._end(row, "completed", None, produced_ms)
        if status == "failed":
            error = job.get("error") if isinstance(job.get("error"), dict) else None
            return await self._end(row, "failed", {"code": str((error or {}).get("code") or "video_generation_failed"),
                                                   "message": str((error or {}).get("message") or "")})
        progress = job.get("progress")
        return await self._later(row, status if status in store_mod.UNFINISHED else row["status"],
                                 int(progress) if isinstance(progress, (int, float)) else row["progress"])

    async def _later(self, row: dict, status: str, progress: int) -> dict:
        await self.store.progress(row["id"], status, progress, time.time() + self.settings.video_poll_s)
        return dict(row, status=status, progress=progress)

    async def _end(self, row: dict, status: str, error: dict | None, produced_ms: int = 0) -> dict:
        completed_at = int(time.time())
        outcome = "completed" if status == "completed" else "failed"
        settlement = ledger_pb2.Settlement(hold_id=row["hold_id"], outcome=outcome, request_id=row["request_id"],
                                           ended_ms=completed_at * 1000,
                                           units=ledger_pb2.Units(video_ms=produced_ms))
        error_json = json.dumps(error) if error else None
        # A benchmark's unheld call has nothing to settle.
        ended = await self.store.finish(row["id"], status=status, error=error_json, produced_ms=produced_ms,
                                        completed_at=completed_at, hold_id=row["hold_id"],
                                        settlement=settlement.SerializeToString() if row["hold_id"] else None)
        if not ended:
            return await self.store.get(row["id"]) or row
        log.info("video job ended", extra={"video": row["id"], "status": status, "produced_ms": produced_ms})
        return dict(row, status=status, error=error_json, produced_ms=produced_ms, completed_at=completed_at,
                    progress=100 if status == "completed" else row["progress"])

    # The poller

    def start(self) -> None:
        if self.store is not None:
            self._task = asyncio.create_task(self._poll_loop(), name="router-video-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def poll_once(self) -> int:
        """Follows every job whose poll is due (one batch); returns how many."""
        lease_s = max(5.0, 5 * self.settings.video_poll_s)
        rows = await self.store.due(self.settings.video_poll_batch, time.time(), lease_s)

        async def one(row: dict) -> None:
            async with self._slots:
                try:
                    await self.follow(row)
                except Exception:  # noqa: BLE001 - one job's trouble must not stop the others
                    log.exception("following a video job failed", extra={"video": row["id"]})

        await asyncio.gather(*(one(row) for row in rows))
        return len(rows)

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception as error:  # noqa: BLE001 - a passing database error must not end the loop
                log.warning("video poll failed", extra={"error": repr(error)})
            await asyncio.sleep(self.settings.video_poll_s)
