"""auth_svc's store on SQLite and PostgreSQL: the credential cache never admits
a key after it changed, on one replica or across two."""
import asyncio

import pytest

from auth_svc import domain, store as auth_store
from common import db, migrate


async def open_store(db_target) -> auth_store.SqlAuthStore:
    store = auth_store.SqlAuthStore(db.make_engine(db_target.url, schema=db_target.schema), cache_ttl_s=60)
    store.listen()
    return store


async def make_key(store, account_id="acct_1", key_id="key_1", tier="free") -> str:
    await store.create_pending_account(auth_store.AccountRow(account_id, f"{account_id}@example.com", "h",
                                                             "pending", 1))
    secret = domain.new_secret(domain.KEY_PREFIX)
    row = auth_store.KeyRow(key_id, account_id, "n", domain.display(secret), tier, 1, None, None)
    assert await store.activate(account_id, row, domain.secret_hash(secret))
    return domain.secret_hash(secret)


async def wait_listening(*stores) -> None:
    for _ in range(100):
        if all(s.cache.enabled for s in stores):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the key-change listeners did not start")


async def test_revocation_and_tier_apply_at_once_on_one_replica(db_target):
    await migrate.upgrade("auth_svc", db_target.url, db_target.schema)
    store = await open_store(db_target)
    try:
        await wait_listening(store)
        hashed = await make_key(store)
        assert (await store.key_credential(hashed)).tier == "free"
        assert store.cache.get(hashed) is not None
        await store.set_key_tier("key_1", "paid")
        assert (await store.key_credential(hashed)).tier == "paid"
        await store.revoke_key("key_1", 2)
        assert await store.key_credential(hashed) is None
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_change_on_one_replica_reaches_the_other(db_target):
    if db_target.kind != "postgres":
        pytest.skip("replicas share a database only on PostgreSQL")
    await migrate.upgrade("auth_svc", db_target.url, db_target.schema)
    one, two = await open_store(db_target), await open_store(db_target)
    try:
        await wait_listening(one, two)
        hashed = await make_key(one)
        assert (await two.key_credential(hashed)).tier == "free"  # now cached by replica two
        await one.revoke_key("key_1", 2)
        for _ in range(100):
            if two.cache.get(hashed) is None:
                break
            await asyncio.sleep(0.005)
        assert await two.key_credential(hashed) is None
    finally:
        await one.close()
        await two.close()
