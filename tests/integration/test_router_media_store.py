"""router_svc's media tables against the real engines (SQLite, and PostgreSQL when
TOKENS_TEST_POSTGRES_URL is set): video jobs are claimed, followed and ended once, with
their settlement in the outbox in the same transaction; image files expire."""
import time

import pytest

from common import db, migrate
from router_svc import store as store_mod
from tokens.ledger.v1 import ledger_pb2


@pytest.fixture
async def engine(db_target):
    await migrate.upgrade("router_svc", db_target.url, db_target.schema)
    engine = db.make_engine(db_target.url, schema=db_target.schema)
    yield engine
    await engine.dispose()


def job(job_id: str, **fields) -> dict:
    now = time.time()
    return {"id": job_id, "account_id": "acct_1", "model": "ref-video", "backend_url": "http://b/v1",
            "backend_job_id": "video_b1", "hold_id": "hold-" + job_id, "prices": "per_second=100000000",
            "request_id": "req-1", "seconds": 4, "size": "720x1280", "prompt": "a boat", "status": "queued",
            "progress": 0, "error": None, "produced_ms": 0, "created_at": int(now), "completed_at": None,
            "deadline_at": now + 600, "next_poll_at": now, **fields}


async def test_video_jobs_are_claimed_followed_and_ended_once(engine):
    videos, outbox = store_mod.VideoStore(engine), store_mod.OutboxStore(engine)
    await videos.insert(job("video_1"))
    await videos.insert(job("video_2", next_poll_at=time.time() + 3600))
    due = await videos.due(10, time.time(), lease_s=30)
    assert [row["id"] for row in due] == ["video_1"]
    assert await videos.due(10, time.time(), lease_s=30) == []  # claimed for the lease
    await videos.progress("video_1", "in_progress", 40, time.time())
    assert (await videos.get("video_1"))["progress"] == 40
    settlement = ledger_pb2.Settlement(hold_id="hold-video_1", outcome="completed",
                                       units=ledger_pb2.Units(video_ms=4000)).SerializeToString()
    assert await videos.finish("video_1", status="completed", error=None, produced_ms=4000, completed_at=1,
                               hold_id="hold-video_1", settlement=settlement)
    assert not await videos.finish("video_1", status="failed", error="{}", produced_ms=0, completed_at=2,
                                   hold_id="hold-video_1", settlement=settlement)
    row = await videos.get("video_1")
    assert (row["status"], row["progress"], row["produced_ms"]) == ("completed", 100, 4000)
    [(hold_id, payload, _attempts)] = await outbox.due(10)
    assert hold_id == "hold-video_1" and ledger_pb2.Settlement.FromString(payload).units.video_ms == 4000
    await videos.progress("video_1", "in_progress", 10, time.time())  # an ended job stays ended
    assert (await videos.get("video_1"))["status"] == "completed"
    assert await videos.unfinished() == 1 and await videos.get("video_nope") is None


async def test_image_files_expire(engine):
    images = store_mod.ImageStore(engine)
    now = time.time()
    await images.put([{"id": "img_a", "account_id": "acct_1", "content_type": "image/png",
                       "content": b"\x89PNG" + bytes(1000), "expires_at": now + 60},
                      {"id": "img_b", "account_id": "acct_1", "content_type": "image/png", "content": b"old",
                       "expires_at": now - 1}])
    assert await images.get("img_a", now) == ("image/png", b"\x89PNG" + bytes(1000))
    assert await images.get("img_b", now) is None
    assert await images.prune(now) == 1
    assert await images.get("img_a", now + 61) is None
