"""The reconciliation's queries (ledger_svc.store.SqlStore as a reconcile.Source) against real
SQLite files and a real PostgreSQL schema: a journal written by the store itself reconciles,
and rows planted in its database by SQL are found, each with its row named."""
import dataclasses

import pytest
import sqlalchemy as sa

from common import migrate
from ledger_svc import billing, domain, reconcile, store, stripe_store, testing
from tests.integration.test_ledger_store import make_ledger

pytestmark = pytest.mark.timeout(180)

USD = 1_000_000_000
POLICY = reconcile.Policy(sweep_slack_ms=15_000, credit_slack_ms=210_000, lago_on=True, lago_window_ms=7 * 86_400_000)


class Stripe:
    """The PaymentIntents billing charged, as Stripe would list them (the real one is in
    test_ledger_reconcile_server.py, against localstripe)."""

    def __init__(self) -> None:
        self.intents: dict[str, dict] = {}

    async def intent_pages(self, created_gte_s):
        yield [i for i in self.intents.values() if i["created"] >= created_gte_s]

    async def find_intent(self, intent_id):
        return self.intents.get(intent_id)


@dataclasses.dataclass
class Books:
    ledger: object
    stripe: Stripe
    holds: dict[str, str]

    @property
    def clock(self) -> testing.FakeClock:
        return self.ledger.clock

    async def run(self, since_ms: int = 0, policy: reconcile.Policy = POLICY):
        reconciler = reconcile.Reconciler(self.ledger.store, self.stripe, self.clock, policy)
        items = [item async for item in reconciler.run(since_ms, reconcile.DRIFTS_MAX)]
        drifts = [i for i in items if isinstance(i, reconcile.Drift)]
        summaries = {i.kind: i for i in items if isinstance(i, reconcile.Summary)}
        return drifts, summaries

    async def sql(self, statement, **params) -> None:
        async with self.ledger.engine.begin() as conn:
            await conn.execute(statement, params)


async def settle(ledger, hold_id: str, units: domain.Units, outcome: str = domain.COMPLETED, request_id: str = ""):
    [result] = await ledger.store.settle([domain.Settlement(hold_id, units, outcome, request_id or f"req-{hold_id}",
                                                            ledger.clock())])
    return result


@pytest.fixture
async def books(db_target):
    await migrate.upgrade("ledger_svc", db_target.url, db_target.schema)
    clock = testing.FakeClock()
    ledger = await make_ledger(db_target, clock, hold_claim_s=10)
    for account in ("acct_a", "acct_b"):
        await ledger.store.open_account(account, f"{account}@example.com")
    holds = {}
    for name, account in (("posted", "acct_a"), ("failed", "acct_a"), ("aborted", "acct_b"), ("expired", "acct_a"),
                          ("late", "acct_b"), ("pending", "acct_b")):
        decision = await ledger.store.hold(ledger.hold_request(account, hold_id=f"hold-{name}"))
        holds[name] = decision.hold_id
    await settle(ledger, holds["posted"], domain.Units(120, 3000))
    await settle(ledger, holds["failed"], domain.Units(), domain.FAILED)
    await settle(ledger, holds["aborted"], domain.Units(40, 7), domain.ABORTED)
    clock.advance(11_000)  # "expired" and "late" lapse unclaimed; "pending" is claimed below
    await ledger.store.claim_holds([holds["pending"]])
    assert await ledger.store.expire_due() == 2
    await settle(ledger, holds["late"], domain.Units(5, 5))  # after its lapse: still charged
    # A top-up, credited the way billing credits one.
    bills = stripe_store.BillingStore(ledger.store, clock)
    await bills.save_customer("acct_a", "cus_a")
    stripe = Stripe()
    await bills.add_topup(billing.Topup("topup_1", "acct_a", 5 * USD, "usd", "pm_1", billing.PENDING, clock()))
    payment = billing.Payment(billing.SUCCEEDED_EVENT, "pi_1", "cus_a", 500, "usd", "acct_a", "topup_1")
    assert (await bills.credit(payment, "topup_1", "acct_a", "")).ok
    stripe.intents["pi_1"] = {"id": "pi_1", "status": "succeeded", "amount": 500, "currency": "usd",
                              "customer": "cus_a", "created": clock() // 1000,
                              "metadata": {"account_id": "acct_a", "topup_id": "topup_1"}}
    yield Books(ledger, stripe, holds)
    await ledger.store.close()
    await ledger.engine.dispose()


async def test_a_journal_the_store_wrote_reconciles(books):
    drifts, summaries = await books.run()
    assert drifts == []
    journal = {f.name: (f.count, f.amount_nanos) for f in summaries[reconcile.JOURNAL].figures}
    posted = [(await books.ledger.store.get_hold(books.holds[n])).cost_nanos for n in ("posted", "aborted", "late")]
    assert journal["calls"] == (6, None) and journal["posted"] == (3, sum(posted))
    assert (journal["voided"][0], journal["expired"][0], journal["pending"][0]) == (1, 1, 1)
    assert journal["sum of balances"] == (None, 0) and journal["accounts"] == (6, None)
    assert journal["customer balances"] == (None, 25 * USD - sum(posted))
    stripe = {f.name: (f.count, f.amount_nanos) for f in summaries[reconcile.STRIPE].figures}
    assert stripe["credited"] == (1, 5 * USD)
    lago = {f.name: (f.count, f.amount_nanos) for f in summaries[reconcile.LAGO].figures}
    assert lago == {"settled calls": (3, sum(posted)), "exported": (0, None), "queued": (3, None)}
    assert [s.status for s in summaries.values()] == ["ok", "ok", "ok"]


async def test_pages_are_read_to_the_end(books, monkeypatch):
    """Calls in pages of two (keyset on the hold id), accounts and settled calls in partitions of two."""
    monkeypatch.setattr(store, "RECONCILE_PAGE", 2)
    # A second outbox row for one call: counted, and still one row for the call.
    async with books.ledger.engine.connect() as conn:
        first = (await conn.execute(sa.select(store.lago_outbox).order_by(store.lago_outbox.c.id))).first()
    row = {k: v for k, v in first._mapping.items() if k != "id"}
    await books.sql(store.lago_outbox.insert().values(**row))
    drifts, summaries = await books.run()
    assert {(d.check, d.row) for d in drifts} == {("duplicate_transaction_id", f"lago:{first.transaction_id}")}
    assert {f.name: f.count for f in summaries[reconcile.JOURNAL].figures}["calls"] == 6
    assert {f.name: f.count for f in summaries[reconcile.JOURNAL].figures}["accounts"] == 6
    assert {f.name: f.count for f in summaries[reconcile.LAGO].figures}["settled calls"] == 3


async def _units_changed(b: Books) -> tuple[str, str]:
    await b.sql(store.usage.update().where(store.usage.c.hold_id == b.holds["posted"]).values(output_tokens=2000))
    return "debit_mismatch", f"hold:{b.holds['posted']}"


async def _usage_deleted(b: Books) -> tuple[str, str]:
    await b.sql(store.usage.delete().where(store.usage.c.hold_id == b.holds["aborted"]))
    return "usage_missing", f"hold:{b.holds['aborted']}"


async def _post_of_no_hold(b: Books) -> tuple[str, str]:
    await b.sql(store.transfers.insert().values(id="post:ghost", kind="post", debit_account_id="acct_a",
                                                credit_account_id=domain.SYS_REVENUE, amount_nanos=1, pending_id="",
                                                reason="", created_ms=b.clock()))
    return "transfer_without_hold", "transfer:post:ghost"


async def _balance_edited(b: Books) -> tuple[str, str]:
    await b.sql(store.accounts.update().where(store.accounts.c.id == "acct_b")
                .values(credits_posted=store.accounts.c.credits_posted + 1))
    return "balance_mismatch", "account:acct_b"


async def _hold_left_pending(b: Books) -> tuple[str, str]:
    b.clock.advance(900_000 + 60_000)  # the claimed hold's lifetime, and no sweep ran
    return "pending_past_expiry", f"hold:{b.holds['pending']}"


async def _settled_twice(b: Books) -> tuple[str, str]:
    hold = await b.ledger.store.get_hold(b.holds["posted"])
    await b.sql(store.transfers.insert().values(id=f"void:{hold.id}", kind="void", debit_account_id="acct_a",
                                                credit_account_id=domain.SYS_REVENUE, amount_nanos=hold.amount_nanos,
                                                pending_id=hold.transfer_id, reason="", created_ms=b.clock()))
    return "settled_twice", f"hold:{hold.id}"


async def _credit_without_intent(b: Books) -> tuple[str, str]:
    result, _ = await b.ledger.store.credit("acct_b", 50 * USD, "stripe:pi_invented", "top-up", domain.PAYMENT)
    assert result is domain.TransferResult.CREATED
    return "credited_without_intent", "transfer:stripe:pi_invented"


async def _topup_marked_not_credited(b: Books) -> tuple[str, str]:
    await b.sql(store.billing_topups.insert().values(
        id="topup_2", account_id="acct_b", amount_nanos=5 * USD, currency="usd", payment_method="pm_2",
        status="succeeded", payment_intent_id="pi_2", created_ms=b.clock()))
    return "topup_without_credit", "topup:topup_2"


async def _export_amount(b: Books) -> tuple[str, str]:
    txn = f"req-{b.holds['aborted']}"
    await b.sql(store.lago_outbox.update().where(store.lago_outbox.c.transaction_id == txn)
                .values(cost_nanos=store.lago_outbox.c.cost_nanos + 1))
    return "export_amount_mismatch", f"lago:{txn}"


async def _export_of_nothing(b: Books) -> tuple[str, str]:
    await b.sql(store.lago_outbox.insert().values(transaction_id="req-nobody", account_id="acct_a", event_ms=1,
                                                  cost_nanos=99, properties="{}", created_ms=b.clock()))
    return "exported_not_settled", "lago:req-nobody"


async def _export_deleted(b: Books) -> tuple[str, str]:
    txn = f"req-{b.holds['late']}"
    await b.sql(store.lago_outbox.delete().where(store.lago_outbox.c.transaction_id == txn))
    return "not_exported", f"lago:{txn}"


@pytest.mark.parametrize("plant", [_units_changed, _usage_deleted, _post_of_no_hold, _balance_edited,
                                   _hold_left_pending, _settled_twice, _credit_without_intent,
                                   _topup_marked_not_credited, _export_amount, _export_of_nothing, _export_deleted],
                         ids=lambda f: f.__name__.strip("_"))
async def test_a_planted_drift_is_found_and_its_row_named(books, plant):
    expected = await plant(books)
    drifts, summaries = await books.run()
    assert expected in {(d.check, d.row) for d in drifts}, drifts
    kind = next(d.kind for d in drifts if (d.check, d.row) == expected)
    assert summaries[kind].status == reconcile.DRIFT


async def test_since_skips_older_calls_and_strays(books):
    await _units_changed(books)
    await _export_of_nothing(books)
    books.clock.advance(1000)
    drifts, summaries = await books.run(since_ms=books.clock())
    assert drifts == []
    assert {f.name: f.count for f in summaries[reconcile.JOURNAL].figures}["calls"] == 0
