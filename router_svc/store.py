"""router_svc's SQL: the outbox of settlements ledger_svc has not confirmed yet."""
import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

metadata = sa.MetaData()

outbox = sa.Table(
    "settlement_outbox", metadata,
    sa.Column("hold_id", sa.String(64), primary_key=True),
    # A serialized tokens.ledger.v1.Settlement.
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
)


async def _queue(conn, items: list[tuple[str, bytes]]) -> None:
    """Puts (hold id, serialized Settlement) pairs in the outbox, in the caller's transaction;
    a hold already waiting there keeps its first copy."""
    now = time.time()
    known = set((await conn.execute(sa.select(outbox.c.hold_id).where(
        outbox.c.hold_id.in_([hold for hold, _ in items])))).scalars())
    fresh = [{"hold_id": h, "payload": p, "attempts": 0, "next_attempt_at": now, "created_at": now}
             for h, p in items if h not in known]
    if fresh:
        await conn.execute(outbox.insert(), fresh)


class OutboxStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def close(self) -> None:
        await self.engine.dispose()

    async def put(self, items: list[tuple[str, bytes]]) -> None:
        """Keeps settlements for later; a hold already waiting keeps its first copy."""
        if not items:
            return
        async with self.engine.begin() as conn:
            await _queue(conn, items)

    async def due(self, limit: int) -> list[tuple[str, bytes, int]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(outbox.c.hold_id, outbox.c.payload, outbox.c.attempts)
                                      .where(outbox.c.next_attempt_at <= time.time())
                                      .order_by(outbox.c.next_attempt_at).limit(limit))
            return [tuple(r) for r in rows]

    async def done(self, hold_ids: list[str]) -> None:
        if hold_ids:
            async with self.engine.begin() as conn:
                await conn.execute(outbox.delete().where(outbox.c.hold_id.in_(hold_ids)))

    async def retry_later(self, hold_ids: list[str], attempts: int) -> None:
        delay_s = min(60.0, 2.0 ** min(attempts, 6))
        async with self.engine.begin() as conn:
            await conn.execute(outbox.update().where(outbox.c.hold_id.in_(hold_ids)).values(
                attempts=outbox.c.attempts + 1, next_attempt_at=time.time() + delay_s))

    async def depth(self) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(sa.func.count()).select_from(outbox))).scalar_one()


# --- media -------------------------------------------------------------------------------

UNFINISHED = ("queued", "in_progress")

video_jobs = sa.Table(
    "video_jobs", metadata,
    # The gateway's id (video_<hex>): the backend's own id never reaches the client.
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("account_id", sa.String(128), nullable=False, index=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("backend_url", sa.String(512), nullable=False),
    sa.Column("backend_job_id", sa.String(256), nullable=False),
    # The hold ledger_svc took for the requested seconds, and its price snapshot (x-ts-price).
    sa.Column("hold_id", sa.String(64), nullable=False),
    sa.Column("prices", sa.String(512), nullable=False),
    sa.Column("request_id", sa.String(200), nullable=False),
    sa.Column("seconds", sa.Integer, nullable=False),
    sa.Column("size", sa.String(32), nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    # queued -> in_progress -> completed | failed
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("progress", sa.Integer, nullable=False),
    # JSON {"code", "message"} of a failed job.
    sa.Column("error", sa.Text, nullable=True),
    # What was charged: milliseconds of video produced (0 until it completes).
    sa.Column("produced_ms", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("completed_at", sa.Integer, nullable=True),
    # Unix seconds: the job fails if not finished by then; it is next polled at next_poll_at.
    sa.Column("deadline_at", sa.Float, nullable=False),
    sa.Column("next_poll_at", sa.Float, nullable=False),
    sa.Index("ix_video_jobs_status_next_poll_at", "status", "next_poll_at"),
)

image_files = sa.Table(
    "image_files", metadata,
    # img_<hex>: the URL an images call returned with response_format "url".
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("account_id", sa.String(128), nullable=False),
    sa.Column("content_type", sa.String(64), nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)


class VideoStore:
    """Video jobs: who owns each, where it runs, its hold, and where it stands."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def insert(self, job: dict) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(video_jobs.insert(), [job])

    async def get(self, job_id: str) -> dict | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(video_jobs).where(video_jobs.c.id == job_id))).first()
        return dict(row._mapping) if row is not None else None

    async def due(self, limit: int, now: float, lease_s: float) -> list[dict]:
        """Unfinished jobs whose poll is due, claimed for `lease_s` (another replica skips them)."""
        async with self.engine.begin() as conn:
            rows = [dict(r._mapping) for r in await conn.execute(
                sa.select(video_jobs).where(video_jobs.c.status.in_(UNFINISHED),
                                            video_jobs.c.next_poll_at <= now)
                .order_by(video_jobs.c.next_poll_at).limit(limit))]
            if rows:
                await conn.execute(video_jobs.update().where(video_jobs.c.id.in_([r["id"] for r in rows]))
                                   .values(next_poll_at=now + lease_s))
        return rows

    async def progress(self, job_id: str, status: str, progress: int, next_poll_at: float) -> None:
        """A job still running: its latest status and progress."""
        async with self.engine.begin() as conn:
            await conn.execute(video_jobs.update().where(video_jobs.c.id == job_id,
                                                         video_jobs.c.status.in_(UNFINISHED))
                               .values(status=status, progress=progress, next_poll_at=next_poll_at))

    async def finish(self, job_id: str, *, status: str, error: str | None, produced_ms: int, completed_at: int,
                     hold_id: str, settlement: bytes | None) -> bool:
        """Ends a job and queues its settlement in the outbox, in one transaction; False when the
        job had already ended (another poll or replica got there first), so it is settled once."""
        async with self.engine.begin() as conn:
            changed = await conn.execute(
                video_jobs.update().where(video_jobs.c.id == job_id, video_jobs.c.status.in_(UNFINISHED))
                .values(status=status, error=error, produced_ms=produced_ms, completed_at=completed_at,
                        progress=100 if status == "completed" else video_jobs.c.progress))
            if changed.rowcount != 1:
                return False
            if settlement is None:
                return True
            await _queue(conn, [(hold_id, settlement)])
        return True

    async def unfinished(self) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(sa.func.count()).select_from(video_jobs)
                                       .where(video_jobs.c.status.in_(UNFINISHED)))).scalar_one()


class ImageStore:
    """Images served back through the gateway, each until its URL expires."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def put(self, items: list[dict]) -> None:
        if items:
            async with self.engine.begin() as conn:
                await conn.execute(image_files.insert(), items)

    async def get(self, file_id: str, now: float) -> tuple[str, bytes] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(image_files.c.content_type, image_files.c.content)
                                      .where(image_files.c.id == file_id, image_files.c.expires_at > now))).first()
        return (row[0], bytes(row[1])) if row is not None else None

    async def prune(self, now: float, limit: int = 1000) -> int:
        """Deletes up to `limit` expired images; returns how many."""
        async with self.engine.begin() as conn:
            expired = list((await conn.execute(sa.select(image_files.c.id).where(image_files.c.expires_at <= now)
                                               .limit(limit))).scalars())
            if expired:
                await conn.execute(image_files.delete().where(image_files.c.id.in_(expired)))
        return len(expired)
