"""SQLAlchemy engines: SQLite files by default, PostgreSQL in production.

URLs may be written plainly (sqlite:///path, postgresql://...); the async
driver is chosen here. A PostgreSQL schema may be given (tests isolate each
run in its own), and every statement has a timeout.
"""
import sqlalchemy
from sqlalchemy import event
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


def make_engine(url: str, *, schema: str | None = None, pool_size: int = 10) -> AsyncEngine:
    url = async_url(url)
    if is_sqlite(url):
        # One connection: SQLite has one writer anyway, and a single connection
        # can never meet SQLITE_BUSY from itself.
        engine = create_async_engine(url, pool_size=1, max_overflow=0,
                                     connect_args={"timeout": STATEMENT_TIMEOUT_S})
        _sqlite_pragmas(engine)
        return engine
    settings = {"statement_timeout": str(STATEMENT_TIMEOUT_S * 1000)}
    if schema:
        settings["search_path"] = schema
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_timeout=5,
        connect_args={"server_settings": settings, "timeout": 5, "command_timeout": STATEMENT_TIMEOUT_S})


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection, _record):
        # Let SQLAlchemy decide when transactions begin (see on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={STATEMENT_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection):
        # IMMEDIATE takes the write lock up front, so two processes sharing a
        # file never deadlock upgrading read locks.
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
