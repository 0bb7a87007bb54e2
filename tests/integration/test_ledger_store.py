"""ledger_svc.store.SqlStore against real SQLite files and a real PostgreSQL schema."""
import asyncio
import random
import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from common import db, migrate, pricing
from ledger_svc import batcher, domain, store, testing

pytestmark = pytest.mark.timeout(180)

USD = 1_000_000_000
PRICES = {"ref-chat": {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000},
          "ref-chat-large": {"input_per_million_tokens": 3 * USD, "output_per_million_tokens": 15 * USD}}
WORST = domain.Units(input_tokens=1000, output_tokens=4096)
WORST_NANOS = pricing.cost_nanos(PRICES["ref-chat"], WORST.as_usage())  # 6,644,000 nanos


class Ledger:
    def __init__(self, target, engine, clock, sql_store) -> None:
        self.target, self.engine, self.clock, self.store = target, engine, clock, sql_store

    def hold_request(self, account_id: str, amount: int = WORST_NANOS, model: str = "ref-chat",
                     hold_id: str | None = None, key_id: str = "key_1") -> domain.HoldRequest:
        version = self.store.price_book.current(model, self.clock() // 1000)
        return domain.HoldRequest(hold_id=hold_id or str(uuid.uuid4()), account_id=account_id, key_id=key_id,
                                  model=model, request_id="req-" + uuid.uuid4().hex[:8], prices=version.prices,
                                  price_version=version.version, amount_nanos=amount)

    async def pair(self, account_id: str, units: domain.Units, outcome: str = domain.COMPLETED):
        decision = await self.store.hold(self.hold_request(account_id))
        if not decision.result.admitted:
            return decision, None
        [result] = await self.store.settle([domain.Settlement(decision.hold_id, units, outcome, "r",
                                                              self.clock())])
        return decision, result

    async def check_books(self) -> store.JournalStats:
        stats = await self.store.journal_stats()
        assert stats.sum_of_balances_nanos == 0, "debits must equal credits"
        assert stats.debits_pending_nanos == stats.credits_pending_nanos
        return stats

    async def outbox(self, table: sa.Table) -> list:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(table).order_by(table.c.id))).all()


async def make_ledger(target, clock, **options) -> Ledger:
    engine = db.make_engine(target.url, schema=target.schema)
    settings = {"signup_credit_nanos": 10 * USD, "low_balance_nanos": 5 * USD, "hold_ttl_s": 900,
                "export_lago": True, **options}
    sql_store = store.SqlStore(engine, clock, **settings)
    await sql_store.seed_prices(PRICES)
    return Ledger(target, engine, clock, sql_store)


@pytest.fixture
async def ledger(db_target):
    await migrate.upgrade("ledger_svc", db_target.url, db_target.schema)
    made = await make_ledger(db_target, testing.FakeClock())
    yield made
    await made.store.close()
    await made.engine.dispose()


async def test_migration_matches_the_tables(ledger):
    await migrate.check("ledger_svc", ledger.engine)
    async with ledger.engine.connect() as conn:
        diff = await conn.run_sync(lambda sync: compare_metadata(MigrationContext.configure(
            sync, opts={"version_table": migrate.version_table("ledger_svc")}), store.metadata))
    assert diff == []
    stats = await ledger.check_books()
    assert stats.accounts == len(domain.SYSTEM_ACCOUNTS)


async def test_500_concurrent_pairs_on_one_account(ledger):
    account = await ledger.store.open_account("acct_busy", "busy@example.com")
    assert account.balance_nanos == 10 * USD
    rng = random.Random(7)
    units = [domain.Units(rng.randint(0, 1000), rng.randint(0, 4096)) for _ in range(500)]
    results = await asyncio.gather(*(ledger.pair("acct_busy", u) for u in units))
    assert all(decision.result is domain.HoldResult.ADMITTED for decision, _ in results)
    assert all(result.status is domain.SettleStatus.POSTED for _, result in results)
    charged = sum(result.cost_nanos for _, result in results)
    assert charged == sum(pricing.cost_nanos(PRICES["ref-chat"], u.as_usage()) for u in units)
    account = await ledger.store.get_account("acct_busy")
    assert (account.balance_nanos, account.held_nanos) == (10 * USD - charged, 0)
    stats = await ledger.check_books()
    assert (stats.pending_holds, stats.transfers) == (0, 1 + 500 + 500)
    # Group commit: far fewer transactions than operations.
    assert ledger.store.batcher.batches < 500


@pytest.mark.parametrize("spend", ["worst", "random"])
async def test_credit_runs_out_midway(ledger, spend):
    await ledger.store.open_account("acct_thin", "")
    # Leave $0.05: about eight calls' worst case.
    result, _ = await ledger.store.credit("acct_thin", -(10 * USD - 50_000_000), "to-five-cents", "trim",
                                          domain.ADJUSTMENT)
    assert result is domain.TransferResult.CREATED
    rng = random.Random(spend)
    units = [WORST if spend == "worst" else domain.Units(rng.randint(0, 1000), rng.randint(0, 4096))
             for _ in range(500)]
    lowest = []
    done = asyncio.Event()

    async def watch() -> None:
        """Reads the balance while the calls run: it may never sink below one worst case."""
        while not done.is_set():
            account = await ledger.store.get_account("acct_thin")
            lowest.append(account.balance_nanos)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(ledger.pair("acct_thin", u) for u in units))
    done.set()
    await watcher
    assert len(lowest) > 1 and min(lowest) >= -WORST_NANOS
    admitted = [r for d, r in results if d.result is domain.HoldResult.ADMITTED]
    denied = [d for d, _ in results if d.result is domain.HoldResult.INSUFFICIENT_CREDIT]
    assert len(admitted) + len(denied) == 500
    assert len(admitted) >= 8 and denied
    account = await ledger.store.get_account("acct_thin")
    assert account.balance_nanos == 50_000_000 - sum(r.cost_nanos for r in admitted)
    assert account.balance_nanos >= -WORST_NANOS, "below zero by more than one call's worst case"
    if account.available_nanos <= 0:
        later = await ledger.store.hold(ledger.hold_request("acct_thin"))
        assert later.result is domain.HoldResult.INSUFFICIENT_CREDIT
    await ledger.check_books()


async def test_two_replicas_share_one_account(ledger):
    """Two stores (two engines, as two ledger processes) admitting on the same account."""
    await ledger.store.open_account("acct_shared", "")
    await ledger.store.credit("acct_shared", -(10 * USD - 30_000_000), "trim", "", domain.ADJUSTMENT)
    other = await make_ledger(ledger.target, ledger.clock)
    try:
        calls = [replica.pair("acct_shared", WORST) for _ in range(150) for replica in (ledger, other)]
        results = await asyncio.gather(*calls)
    finally:
        await other.store.close()
        await other.engine.dispose()
    admitted = [r for d, r in results if d.result.admitted]
    account = await ledger.store.get_account("acct_shared")
    assert account.balance_nanos == 30_000_000 - WORST_NANOS * len(admitted)
    assert account.balance_nanos >= -WORST_NANOS
    await ledger.check_books()


async def test_replays_change_nothing_and_conflicts_are_refused(ledger):
    s = ledger.store
    await s.open_account("acct_r", "r@example.com")
    credit = ("acct_r", 7 * USD, "pi_123", "top-up", domain.PAYMENT)
    assert (await s.credit(*credit))[0] is domain.TransferResult.CREATED
    hold = ledger.hold_request("acct_r", amount=1_000_000)
    assert (await s.hold(hold)).result is domain.HoldResult.ADMITTED
    settlement = domain.Settlement(hold.hold_id, domain.Units(100, 200), domain.COMPLETED, "req-r", ledger.clock())
    [first] = await s.settle([settlement])
    assert first.status is domain.SettleStatus.POSTED
    expired = ledger.hold_request("acct_r", amount=2_000_000)
    await s.hold(expired)
    ledger.clock.advance(901_000)
    assert await s.expire_due() == 1

    before = (await s.get_account("acct_r"), await ledger.check_books(), await ledger.outbox(store.lago_outbox))
    # Replays: every grant, credit, hold, settlement and expiry again, with the same ids.
    assert (await s.open_account("acct_r", "r@example.com")).balance_nanos == before[0].balance_nanos
    assert (await s.credit(*credit))[0] is domain.TransferResult.EXISTS
    assert (await s.hold(hold)).result is domain.HoldResult.EXISTS
    assert (await s.settle([settlement]))[0] == domain.SettleResult(hold.hold_id, domain.SettleStatus.DUPLICATE,
                                                                    first.cost_nanos)
    assert await s.expire_due() == 0
    # The same ids with other fields: refused, nothing moves.
    assert (await s.credit("acct_r", 8 * USD, "pi_123", "top-up", domain.PAYMENT))[0] is \
        domain.TransferResult.EXISTS_WITH_DIFFERENT_AMOUNT
    await s.open_account("acct_other", "")
    assert (await s.credit("acct_other", 7 * USD, "pi_123", "top-up", domain.PAYMENT))[0] is \
        domain.TransferResult.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
    assert (await s.credit("acct_r", 7 * USD, "pi_123", "other reason", domain.PAYMENT))[0] is \
        domain.TransferResult.EXISTS_WITH_DIFFERENT_REASON
    changed = domain.HoldRequest(**{**{f: getattr(hold, f) for f in hold.__slots__}, "amount_nanos": 5})
    assert (await s.hold(changed)).result is domain.HoldResult.EXISTS_WITH_DIFFERENT_FIELDS
    other_units = domain.Settlement(hold.hold_id, domain.Units(100, 201), domain.COMPLETED, "req-r",
                                    settlement.ended_ms)
    assert (await s.settle([other_units]))[0].status is domain.SettleStatus.CONFLICT
    assert (await s.credit("acct_r", 1, "post:" + hold.hold_id, "", domain.ADJUSTMENT))[0] is \
        domain.TransferResult.ID_RESERVED
    assert (await s.credit("acct_nobody", 1, "t-nobody", "", domain.PAYMENT))[0] is \
        domain.TransferResult.CREDIT_ACCOUNT_NOT_FOUND
    after_account = await s.get_account("acct_r")
    assert after_account == before[0]
    stats = await ledger.check_books()
    # One transfer more: acct_other's signup grant.
    assert (stats.transfers, stats.pending_holds) == (before[1].transfers + 1, before[1].pending_holds)
    assert await ledger.outbox(store.lago_outbox) == before[2]


async def test_a_new_price_never_reprices_a_held_call(ledger):
    s = ledger.store
    await s.open_account("acct_p", "")
    old = s.price_book.current("ref-chat", ledger.clock() // 1000)
    held = ledger.hold_request("acct_p", amount=10_000_000)
    await s.hold(held)
    doubled = {unit: nanos * 2 for unit, nanos in old.prices.items()}
    new = await s.set_price("ref-chat", doubled, ledger.clock() // 1000)
    assert new.version == old.version + 1
    assert s.price_book.current("ref-chat", ledger.clock() // 1000) == new
    units = domain.Units(1_000, 2_000)
    [result] = await s.settle([domain.Settlement(held.hold_id, units, domain.COMPLETED, "r", ledger.clock())])
    assert result.cost_nanos == pricing.cost_nanos(old.prices, units.as_usage())
    assert (await s.get_hold(held.hold_id)).price_version == old.version
    # A scheduled price takes effect when its time comes; the catalog seeding adds a version
    # only when the list price differs from the price in effect.
    later = await s.set_price("ref-chat", old.prices, ledger.clock() // 1000 + 3600)
    assert s.price_book.current("ref-chat", ledger.clock() // 1000) == new
    ledger.clock.advance(3_600_000)
    assert s.price_book.current("ref-chat", ledger.clock() // 1000) == later
    assert await s.seed_prices(PRICES) == []
    [seeded] = await s.seed_prices({"ref-chat": doubled})
    assert seeded.version == later.version + 1


async def test_an_unclaimed_hold_lapses_soon_and_a_claimed_one_lives_its_full_lifetime(ledger):
    """A hold whose call never reached a router stops holding credit after the claim
    window; one a router claimed keeps holding it for the hold lifetime from the claim,
    and a claim renewed while the call runs extends it again."""
    s = await make_ledger(ledger.target, ledger.clock, hold_claim_s=60)
    try:
        await s.store.open_account("acct_c", "")
        orphan, running, settled = (s.hold_request("acct_c", amount=USD) for _ in range(3))
        for request in (orphan, running, settled):
            assert (await s.store.hold(request)).result.admitted
        [result] = await s.store.settle([domain.Settlement(settled.hold_id, domain.Units(10, 10), domain.COMPLETED,
                                                           "r", ledger.clock())])
        assert result.status is domain.SettleStatus.POSTED
        ledger.clock.advance(30_000)
        # Claiming twice, a settled hold and an unknown one: only the running call's hold moves.
        assert await s.store.claim_holds([running.hold_id, running.hold_id, settled.hold_id, "nope"]) == 1
        assert await s.store.claim_holds([running.hold_id]) == 0, "the same instant: nothing to extend"
        created_ms = (await s.store.get_hold(running.hold_id)).created_ms
        assert (await s.store.get_hold(running.hold_id)).expires_ms == created_ms + 30_000 + 900_000
        assert (await s.store.get_account("acct_c")).held_nanos == 2 * USD
        ledger.clock.advance(30_001)
        assert await s.store.expire_due() == 1
        assert (await s.store.get_hold(orphan.hold_id)).status == domain.EXPIRED
        assert (await s.store.get_hold(running.hold_id)).status == domain.PENDING
        assert (await s.store.get_account("acct_c")).held_nanos == USD
        assert await s.store.claim_holds([orphan.hold_id]) == 0, "an expired hold is not brought back"
        ledger.clock.advance(800_000)
        assert await s.store.claim_holds([running.hold_id]) == 1, "renewed while its call runs"
        ledger.clock.advance(800_000)
        assert await s.store.expire_due() == 0
        assert (await s.store.get_hold(running.hold_id)).status == domain.PENDING
        ledger.clock.advance(100_001)
        assert await s.store.expire_due() == 1
        assert (await s.store.get_account("acct_c")).held_nanos == 0
        await s.check_books()
    finally:
        await s.store.close()
        await s.engine.dispose()


async def test_an_expired_hold_frees_credit_and_a_late_settlement_still_posts(ledger):
    s = ledger.store
    await s.open_account("acct_e", "")
    held = ledger.hold_request("acct_e", amount=3 * USD)
    await s.hold(held)
    assert (await s.get_account("acct_e")).available_nanos == 7 * USD
    ledger.clock.advance(899_000)
    assert await s.expire_due() == 0
    ledger.clock.advance(2_000)
    assert await s.expire_due() == 1
    account = await s.get_account("acct_e")
    assert (account.balance_nanos, account.held_nanos) == (10 * USD, 0)
    assert (await s.get_hold(held.hold_id)).status == domain.EXPIRED
    units = domain.Units(2_000, 1_000)
    late = domain.Settlement(held.hold_id, units, domain.COMPLETED, "req-late", ledger.clock())
    [result] = await s.settle([late])
    cost = pricing.cost_nanos(PRICES["ref-chat"], units.as_usage())
    assert (result.status, result.cost_nanos) == (domain.SettleStatus.POSTED, cost)
    account = await s.get_account("acct_e")
    assert (account.balance_nanos, account.held_nanos) == (10 * USD - cost, 0)
    kinds = [t.kind for t in await s.transfers_of("acct_e")]
    assert kinds == [domain.GRANT, domain.HOLD, domain.EXPIRE, domain.POST]
    assert (await s.settle([late]))[0].status is domain.SettleStatus.DUPLICATE
    await ledger.check_books()


async def test_notices_once_per_crossing_and_armed_again_after_credit(ledger):
    s = ledger.store
    await s.open_account("acct_n", "n@example.com")

    async def spend(usd: int) -> None:
        # ref-chat-large output costs $15 per million tokens: 66,667 tokens ~ $1.
        units = domain.Units(0, usd * 1_000_000 // 15)
        version = s.price_book.current("ref-chat-large", ledger.clock() // 1000)
        # Held for what it will cost: a settlement is never charged more than its hold.
        request = domain.HoldRequest(str(uuid.uuid4()), "acct_n", "k", "ref-chat-large", "r", version.prices,
                                     version.version, pricing.cost_nanos(version.prices, units.as_usage()))
        decision = await s.hold(request)
        assert decision.result.admitted
        await s.settle([domain.Settlement(decision.hold_id, units, domain.COMPLETED, "r", ledger.clock())])

    async def kinds() -> list[str]:
        return [row.kind for row in await ledger.outbox(store.email_outbox)]

    await spend(4)  # 10 -> ~6
    assert await kinds() == []
    await spend(2)  # -> ~4: below $5
    assert await kinds() == [domain.LOW]
    await spend(1)  # -> ~3: still below, no second email
    assert await kinds() == [domain.LOW]
    await spend(3)  # -> ~0
    await spend(1)  # -> below zero (admitted: ~0.0000 left was > 0, or denied)
    assert await kinds() == [domain.LOW, domain.ZERO]
    await s.credit("acct_n", 20 * USD, "pi_topup", "top-up", domain.PAYMENT)  # -> ~19
    await spend(15)  # back below $5
    await spend(5)  # and to zero again
    assert await kinds() == [domain.LOW, domain.ZERO, domain.LOW, domain.ZERO]
    rows = await ledger.outbox(store.email_outbox)
    assert {row.to_addr for row in rows} == {"n@example.com"}
    assert rows[-1].balance_nanos <= 0 < rows[-2].balance_nanos < 5 * USD


async def test_list_usage_pages_filters_and_daily_totals(ledger):
    s = ledger.store
    await s.open_account("acct_u", "")
    await s.open_account("acct_stranger", "")
    day_ms = 86_400_000
    calls = []
    for i in range(7):
        model = "ref-chat" if i % 2 == 0 else "ref-chat-large"
        key = "key_a" if i < 4 else "key_b"
        version = s.price_book.current(model, ledger.clock() // 1000)
        units = domain.Units(100 * (i + 1), 10 * (i + 1))
        request = domain.HoldRequest(f"h{i}", "acct_u", key, model, f"req-{i}", version.prices, version.version,
                                     pricing.cost_nanos(version.prices, units.as_usage()))
        assert (await s.hold(request)).result.admitted
        ended = testing.START_MS + (i // 3) * day_ms + i * 1000
        await s.settle([domain.Settlement(f"h{i}", units, domain.COMPLETED, f"req-{i}", ended)])
        calls.append((i, model, key, units, pricing.cost_nanos(version.prices, units.as_usage()), ended))
    await ledger.pair("acct_stranger", domain.Units(5, 5))

    now = testing.START_MS + 10 * day_ms
    query = domain.usage_query("acct_u", 0, 0, 3, None, "", "", now)
    pages, after = [], None
    while True:
        page = await s.list_usage(domain.UsageQuery(**{**query.__dict__, "after_id": after}))
        pages.append([row.request_id for _, row in page.rows])
        if not page.has_more:
            break
        after = page.rows[-1][0]
    assert pages == [["req-6", "req-5", "req-4"], ["req-3", "req-2", "req-1"], ["req-0"]]
    daily = {(day, model): (requests, units, cost) for day, model, requests, units, cost in page.daily}
    assert set(daily) == {("2026-01-01", "ref-chat"), ("2026-01-01", "ref-chat-large"),
                          ("2026-01-02", "ref-chat"), ("2026-01-02", "ref-chat-large"), ("2026-01-03", "ref-chat")}
    day_two_large = [c for c in calls if c[0] in (3, 5)]
    assert daily[("2026-01-02", "ref-chat-large")] == (
        2, domain.Units(sum(c[3].input_tokens for c in day_two_large), sum(c[3].output_tokens for c in day_two_large)),
        sum(c[4] for c in day_two_large))
    assert sum(cost for *_, cost in page.daily) == sum(c[4] for c in calls)

    by_key = await s.list_usage(domain.usage_query("acct_u", 0, 0, 100, None, "key_b", "", now))
    assert [row.request_id for _, row in by_key.rows] == ["req-6", "req-5", "req-4"]
    by_model = await s.list_usage(domain.usage_query("acct_u", 0, 0, 100, None, "", "ref-chat-large", now))
    assert [row.request_id for _, row in by_model.rows] == ["req-5", "req-3", "req-1"]
    second_day = await s.list_usage(domain.usage_query(
        "acct_u", (testing.START_MS + day_ms) // 1000, (testing.START_MS + 2 * day_ms) // 1000, 100, None, "", "", now))
    assert [row.request_id for _, row in second_day.rows] == ["req-5", "req-4", "req-3"]
    assert [(d[0], d[1]) for d in second_day.daily] == [("2026-01-02", "ref-chat"), ("2026-01-02", "ref-chat-large")]
    with pytest.raises(domain.InvalidArgument):
        domain.usage_query("acct_u", 0, 0, 1001, None, "", "", now)


async def test_lago_outbox_gets_each_charged_call_once(ledger):
    await ledger.store.open_account("acct_l", "")
    await ledger.pair("acct_l", domain.Units(10, 10))
    await ledger.pair("acct_l", domain.Units(10, 10), outcome=domain.FAILED)
    rows = await ledger.outbox(store.lago_outbox)
    assert len(rows) == 1 and rows[0].account_id == "acct_l"
    jobs = await ledger.store.claim("lago", 10, 60_000)
    assert [job.id for job in jobs] == [rows[0].id]
    assert await ledger.store.claim("lago", 10, 60_000) == []  # leased
    await ledger.store.finish("lago", [jobs[0].id], sent=True)
    assert (await ledger.store.journal_stats()).outbox_lago == 0
    assert await ledger.store.prune("lago", ledger.clock()) == 0  # sent just now: kept
    ledger.clock.advance(1)
    assert await ledger.store.prune("lago", ledger.clock()) == 1
    assert await ledger.outbox(store.lago_outbox) == []


async def test_a_full_queue_fails_fast():
    slow = asyncio.Event()

    async def apply(ops):
        await slow.wait()
        return ops

    queue = batcher.Batcher(apply, max_weight=10, linger_s=0, queue_max=2)
    first = asyncio.create_task(queue.submit("a"))
    await asyncio.sleep(0.01)
    waiting = [asyncio.create_task(queue.submit(x)) for x in "bc"]
    await asyncio.sleep(0)
    with pytest.raises(batcher.Overloaded):
        await queue.submit("d")
    slow.set()
    assert [await first, *[await w for w in waiting]] == ["a", "b", "c"]
    await queue.close()
