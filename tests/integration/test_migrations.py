"""Every SQL service's migrations build exactly its tables, on SQLite and
PostgreSQL, side by side in one schema, and a service refuses a database that
is behind."""
import importlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from common import db, migrate

SERVICES = ("auth_svc", "ledger_svc", "router_svc")


async def test_migrations_match_the_tables_of_every_service(db_target):
    for service in SERVICES:
        await migrate.upgrade(service, db_target.url, db_target.schema)
    engine = db.make_engine(db_target.url, schema=db_target.schema)
    try:
        for service in SERVICES:
            await migrate.check(service, engine)
            metadata = importlib.import_module(f"{service}.store").metadata
            async with engine.connect() as conn:
                diff = await conn.run_sync(lambda sync: compare_metadata(MigrationContext.configure(
                    sync, opts={"version_table": migrate.version_table(service),
                                "include_name": lambda name, kind, _parent: kind != "table" or
                                name in metadata.tables}), metadata))
            assert diff == [], (service, diff)
    finally:
        await engine.dispose()


async def test_a_service_refuses_an_unmigrated_database(db_target):
    engine = db.make_engine(db_target.url, schema=db_target.schema)
    try:
        with pytest.raises(migrate.NotMigrated, match="./dev admin migrate"):
            await migrate.check("auth_svc", engine)
    finally:
        await engine.dispose()
