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


async def test_email_keys_keep_every_existing_account_and_take_them_as_verified(db_target, monkeypatch):
    """Rows from before email keys: ALICE@ and alice@ (and a +tag) were three accounts. The
    migration keeps all three, gives the oldest the key and the others their own, and takes
    existing addresses as verified."""
    import asyncio

    import sqlalchemy as sa
    from alembic import command

    monkeypatch.delenv("TOKENS_EMAIL_PLUS_TAGS", raising=False)
    config = migrate.config("auth_svc", db_target.url, db_target.schema)
    await asyncio.to_thread(command.upgrade, config, "39744010e60e")
    engine = db.make_engine(db_target.url, schema=db_target.schema)
    try:
        async with engine.begin() as conn:
            for n, email in enumerate(("alice@example.com", "ALICE@example.com", "alice+x@example.com",
                                       "bob@example.com")):
                await conn.execute(sa.text("INSERT INTO accounts (id, email, password_hash, status, created_at) "
                                           "VALUES (:id, :email, 'h', 'active', :at)"),
                                   {"id": f"acct_{n}", "email": email, "at": 1000 + n})
        await asyncio.to_thread(command.upgrade, config, "head")
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT id, email_key, email_verified_at, ledger_email_at "
                                               "FROM accounts ORDER BY id"))).all()
    finally:
        await engine.dispose()
    assert [(r[0], r[1]) for r in rows] == [("acct_0", "alice@example.com"), ("acct_1", "alice@example.com#acct_1"),
                                            ("acct_2", "alice@example.com#acct_2"), ("acct_3", "bob@example.com")]
    assert all(r[2] == 1000 + n and r[3] == 1000 + n for n, r in enumerate(rows))
