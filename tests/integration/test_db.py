"""common.db's SQLite engine: write_driver, the hot path's transaction on the sqlite3 connection."""
import asyncio
import sqlite3

import pytest
import sqlalchemy as sa

from common import db


@pytest.fixture
async def engine(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path}/t.db")
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"))
    yield engine
    await engine.dispose()


async def rows(engine) -> list[tuple]:
    async with engine.connect() as conn:
        return [tuple(r) for r in (await conn.execute(sa.text("SELECT id, v FROM t ORDER BY id"))).all()]


async def test_a_block_that_ends_is_committed(engine):
    async with engine.write_driver() as lite:
        lite.executemany("INSERT INTO t (id, v) VALUES (?, ?)", [(1, "a"), (2, "b")])
    assert await rows(engine) == [(1, "a"), (2, "b")]


async def test_a_block_that_raises_writes_nothing_and_the_engine_goes_on(engine):
    with pytest.raises(sqlite3.IntegrityError):
        async with engine.write_driver() as lite:
            lite.execute("INSERT INTO t (id, v) VALUES (1, 'a')")
            lite.execute("INSERT INTO t (id, v) VALUES (1, 'again')")  # the same key: refused
    assert await rows(engine) == []
    async with engine.write_driver() as lite:
        lite.execute("INSERT INTO t (id, v) VALUES (3, 'c')")
    async with engine.begin() as conn:  # SQLAlchemy's own transactions still work beside it
        await conn.execute(sa.text("INSERT INTO t (id, v) VALUES (4, 'd')"))
    assert await rows(engine) == [(3, "c"), (4, "d")]


async def test_blocks_take_turns(engine):
    inside = []

    async def block(n: int) -> None:
        async with engine.write_driver() as lite:
            inside.append(n)
            assert len(inside) == 1, "two blocks ran at once"
            lite.execute("INSERT INTO t (id, v) VALUES (?, 'x')", (n,))
            await asyncio.sleep(0.01)
            inside.remove(n)

    await asyncio.gather(*(block(n) for n in range(5)))
    assert [r[0] for r in await rows(engine)] == [0, 1, 2, 3, 4]


async def test_a_cancelled_block_writes_nothing(engine):
    started = asyncio.Event()

    async def block() -> None:
        async with engine.write_driver() as lite:
            lite.execute("INSERT INTO t (id, v) VALUES (9, 'x')")
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(block())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await rows(engine) == []
