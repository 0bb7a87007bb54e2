"""SQLAlchemy engines: SQLite files by default, PostgreSQL in production.

URLs may be written plainly (sqlite:///path, postgresql://...). PostgreSQL
gets SQLAlchemy's async engine on asyncpg, with an optional schema (tests
isolate each run in its own) and a timeout on every statement.

SQLite gets InlineEngine: the same async API (connect(), begin(), execute,
run_sync, dispose), but each statement runs synchronously on the event loop's
thread. A SQLite statement takes tens of microseconds; aiosqlite's thread hop
costs ~20 times that in CPU (measured: ~900 us vs ~50 us per indexed SELECT),
which on the hot path is the whole budget. An asyncio lock serialises users of
the one connection, as a pool of one would.
"""
import asyncio
import contextlib

import sqlalchemy
from sqlalchemy import event, pool
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

STATEMENT_TIMEOUT_S = 10


def async_url(url: str) -> str:
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:"):]
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix):]
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


class _InlineConnection:
    """The subset of AsyncConnection the stores use, over a sync Connection."""

    def __init__(self, conn: sqlalchemy.Connection) -> None:
        self.sync_connection = conn
        self.dialect = conn.dialect

    async def execute(self, statement, parameters=None, **kw):
        return self.sync_connection.execute(statement, parameters, **kw)

    async def scalar(self, statement, parameters=None, **kw):
        return self.sync_connection.scalar(statement, parameters, **kw)

    async def scalars(self, statement, parameters=None, **kw):
        return self.sync_connection.scalars(statement, parameters, **kw)

    async def exec_driver_sql(self, statement, parameters=None):
        return self.sync_connection.exec_driver_sql(statement, parameters)

    async def run_sync(self, fn, *args, **kw):
        return fn(self.sync_connection, *args, **kw)

    async def commit(self) -> None:
        self.sync_connection.commit()

    async def rollback(self) -> None:
        self.sync_connection.rollback()

    def in_transaction(self) -> bool:
        return self.sync_connection.in_transaction()


class InlineEngine:
    """AsyncEngine's shape for SQLite, running statements inline (see the module docstring)."""

    def __init__(self, sync_engine: sqlalchemy.Engine) -> None:
        self.sync_engine = sync_engine
        self.dialect = sync_engine.dialect
        self.url = sync_engine.url
        self._lock: asyncio.Lock | None = None
        self._driver = None  # the sqlite3 connection, once write_driver has taken it

    def _guard(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @contextlib.asynccontextmanager
    async def connect(self):
        """Reads, and single statements: SQLite autocommits each one."""
        async with self._guard():
            with self.sync_engine.connect() as conn:
                yield _InlineConnection(conn)

    @contextlib.asynccontextmanager
    async def begin(self):
        """A write transaction: BEGIN IMMEDIATE, committed unless the block raises."""
        async with self._guard():
            with self.sync_engine.connect() as conn:
                conn.info["write"] = True
                try:
                    with conn.begin():
                        yield _InlineConnection(conn)
                finally:
                    conn.info.pop("write", None)

    @contextlib.asynccontextmanager
    async def write_driver(self):
        """A write transaction (BEGIN IMMEDIATE ... COMMIT) on the sqlite3 connection itself,
        for a hot path that binds its own rows: SQLAlchemy's connection, transaction and
        event objects cost more CPU than a small batch's statements."""
        async with self._guard():
            if self._driver is None:
                with self.sync_engine.connect() as conn:  # StaticPool: always this one connection
                    self._driver = conn.connection.driver_connection
            lite = self._driver
            lite.execute("BEGIN IMMEDIATE")
            try:
                yield lite
                lite.execute("COMMIT")
            except BaseException:
                if lite.in_transaction:  # the block raised, or COMMIT itself failed
                    lite.execute("ROLLBACK")
                raise

    async def dispose(self) -> None:
        self._driver = None
        self.sync_engine.dispose()


def make_engine(url: str, *, schema: str | None = None, pool_size: int = 10) -> AsyncEngine | InlineEngine:
    if is_sqlite(url):
        sync_url = "sqlite:" + url.split(":", 1)[1]
        # One connection: SQLite has one writer anyway, and a single connection
        # can never meet SQLITE_BUSY from itself.
        engine = sqlalchemy.create_engine(sync_url, poolclass=pool.StaticPool,
                                          connect_args={"timeout": STATEMENT_TIMEOUT_S, "check_same_thread": False})
        _sqlite_pragmas(engine)
        return InlineEngine(engine)
    url = async_url(url)
    settings = {"statement_timeout": str(STATEMENT_TIMEOUT_S * 1000)}
    if schema:
        settings["search_path"] = schema
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_timeout=5,
        connect_args={"server_settings": settings, "timeout": 5, "command_timeout": STATEMENT_TIMEOUT_S})


def _sqlite_pragmas(engine: sqlalchemy.Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        # Let SQLAlchemy decide when transactions begin (see on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={STATEMENT_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection):
        # Write transactions take the lock up front (IMMEDIATE), so two
        # processes sharing a file never deadlock upgrading read locks.
        # connect() blocks run in autocommit: each statement on its own.
        if connection.info.get("write"):
            connection.exec_driver_sql("BEGIN IMMEDIATE")


async def create_schema(url: str, schema: str) -> None:
    """Creates a PostgreSQL schema if absent (tests and per-service isolation)."""
    engine = create_async_engine(async_url(url))
    async with engine.begin() as conn:
        await conn.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    await engine.dispose()


async def drop_schema(url: str, schema: str) -> None:
    engine = create_async_engine(async_url(url))
    async with engine.begin() as conn:
        await conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()
