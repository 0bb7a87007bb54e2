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


class OutboxStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def close(self) -> None:
        await self.engine.dispose()

    async def put(self, items: list[tuple[str, bytes]]) -> None:
        """Keeps settlements for later; a hold already waiting keeps its first copy."""
        if not items:
            return
        now = time.time()
        async with self.engine.begin() as conn:
            known = set((await conn.execute(sa.select(outbox.c.hold_id).where(
                outbox.c.hold_id.in_([hold for hold, _ in items])))).scalars())
            fresh = [{"hold_id": h, "payload": p, "attempts": 0, "next_attempt_at": now, "created_at": now}
                     for h, p in items if h not in known]
            if fresh:
                await conn.execute(outbox.insert(), fresh)

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
