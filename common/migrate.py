"""Alembic, driven from code: each SQL service keeps its migrations in
<service>/migrations/ and refuses to start on a database that is behind.
"""
import asyncio
import pathlib

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from common import db

ROOT = pathlib.Path(__file__).resolve().parent.parent


class NotMigrated(SystemExit):
    def __init__(self, service: str, current: str | None, head: str) -> None:
        super().__init__(
            f"{service}: the database is at migration {current or 'none'}, the code needs {head}. "
            f"Run `./dev admin migrate` (or let `./dev up` do it) before starting the service.")


def version_table(service: str) -> str:
    """Each service keeps its own version table, so two never collide in one schema."""
    return f"alembic_version_{service}"


def config(service: str, url: str, schema: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(ROOT / service / "migrations"))
    cfg.attributes["url"] = url
    cfg.attributes["schema"] = schema
    cfg.attributes["service"] = service
    return cfg


def head(service: str) -> str:
    return ScriptDirectory.from_config(config(service, "")).get_current_head()


async def upgrade(service: str, url: str, schema: str | None = None) -> None:
    # Alembic's env.py runs its own event loop, so it gets a thread of its own.
    await asyncio.to_thread(command.upgrade, config(service, url, schema), "head")


async def check(service: str, engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        current = await conn.run_sync(lambda sync: MigrationContext.configure(
            sync, opts={"version_table": version_table(service)}).get_current_revision())
    wanted = head(service)
    if current != wanted:
        raise NotMigrated(service, current, wanted)


def run_env(context, metadata) -> None:
    """The body of every service's migrations/env.py."""
    cfg = context.config
    url, schema = cfg.attributes["url"], cfg.attributes.get("schema")

    def run(sync_connection):
        context.configure(connection=sync_connection, target_metadata=metadata,
                          version_table=version_table(cfg.attributes["service"]),
                          version_table_schema=schema, render_as_batch=db.is_sqlite(url))
        with context.begin_transaction():
            context.run_migrations()

    async def main():
        engine = db.make_engine(url, schema=schema, pool_size=1)
        async with engine.connect() as conn:
            await conn.run_sync(run)
            await conn.commit()
        await engine.dispose()

    asyncio.run(main())
