"""Reconciliation's rules (ledger_svc.reconcile) driven with small fakes.

The journal comes from the ledger's own Book (holds, settlements, expiries, late
settlements, credits) kept in dictionaries; a fake Source hands its rows to the
Reconciler the way the SQL store does, and a fake Stripe lists PaymentIntents.
An honest journal must reconcile; every planted corruption must be found, with
its row named.
"""
import asyncio
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import pricing
from ledger_svc import billing, domain, reconcile

pytestmark = pytest.mark.timeout(300)

USD = 1_000_000_000
PRICES = {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}
WORST = domain.Units(input_tokens=100, output_tokens=400)
NOW_MS = 1_767_225_600_000
POLICY = reconcile.Policy(sweep_slack_ms=15_000, credit_slack_ms=210_000, lago_on=True,
                          lago_window_ms=7 * 86_400_000)


class Journal:
    """The ledger's Book over dictionaries, with the rows a reconciliation reads."""

    def __init__(self) -> None:
        self.now = NOW_MS
        self.accounts = {a: domain.Account(a, kind=domain.SYSTEM) for a in domain.SYSTEM_ACCOUNTS}
        self.holds: dict[str, domain.Hold] = {}
        self.transfers: dict[str, domain.Transfer] = {}
        self.usage: dict[str, domain.UsageRow] = {}
        self.policy = domain.Policy(low_balance_nanos=5 * USD, hold_ttl_ms=60_000, unclaimed_ttl_ms=10_000)

    def _commit(self, book: domain.Book) -> None:
        book.assert_balanced()
        for transfer in book.transfers:
            self.transfers[transfer.id] = transfer
        for row in book.usage:
            self.usage[row.hold_id] = row

    def open(self, account_id: str) -> None:
        self.accounts[account_id] = domain.Account(account_id)
        book = domain.Book(self.accounts, self.holds, self.policy)
        book.post_transfer(domain.signup_grant(account_id, 10 * USD, self.now), None)
        self._commit(book)

    def credit(self, account_id: str, amount: int, transfer_id: str, kind: str = domain.PAYMENT) -> None:
        book = domain.Book(self.accounts, self.holds, self.policy)
        transfer = domain.credit_transfer(account_id, amount, transfer_id, "test", kind, self.now)
        assert book.post_transfer(transfer, self.transfers.get(transfer_id)).ok
        self._commit(book)

    def hold(self, account_id: str, worst: domain.Units = WORST) -> str:
        hold_id = f"h{len(self.holds):04d}"
        book = domain.Book(self.accounts, self.holds, self.policy)
        decision = book.hold(domain.HoldRequest(hold_id, account_id, "key_1", "ref-chat", f"req-{hold_id}", PRICES, 1,
                                                pricing.cost_nanos(PRICES, worst.as_usage())), self.now)
        assert decision.result is domain.HoldResult.ADMITTED, decision
        self._commit(book)
        return hold_id

    def settle(self, hold_id: str, units: domain.Units, outcome: str = domain.COMPLETED) -> domain.SettleResult:
        book = domain.Book(self.accounts, self.holds, self.policy)
        result = book.settle(domain.Settlement(hold_id, units, outcome, f"req-{hold_id}", self.now), self.now)
        self._commit(book)
        return result

    def expire_due(self) -> None:
        book = domain.Book(self.accounts, self.holds, self.policy)
        for hold_id in list(self.holds):
            book.expire(hold_id, self.now)
        self._commit(book)


class FakeSource:
    """reconcile.Source over a Journal (and billing's top-up rows, Lago's outbox), in small pages."""

    PAGE = 3

    def __init__(self, journal: Journal) -> None:
        self.j = journal
        self.customers: dict[str, str] = {}  # Stripe customer -> account
        self.topups: dict[str, reconcile.TopupRow] = {}  # PaymentIntent id -> top-up row (succeeded)
        self.exports: list[reconcile.Export] = []

    async def _pages(self, rows, each) -> None:
        for start in range(0, len(rows), self.PAGE):
            each(rows[start:start + self.PAGE])

    async def scan_calls(self, since_ms, each):
        rows = []
        for hold_id, hold in sorted(self.j.holds.items()):
            if hold.created_ms >= since_ms or hold.settled_ms >= since_ms:
                t = self.j.transfers.get
                rows.append(reconcile.CallRow(hold, t("hold:" + hold_id), t("post:" + hold_id), t("void:" + hold_id),
                                              t("expire:" + hold_id), self.j.usage.get(hold_id)))
        await self._pages(rows, each)

    async def stray_transfers(self, since_ms, limit):
        prefixes = {domain.HOLD: "hold:", domain.POST: "post:", domain.VOID: "void:", domain.EXPIRE: "expire:"}
        stray = [t for t in self.j.transfers.values() if t.kind in prefixes and t.created_ms >= since_ms
                 and (not t.id.startswith(prefixes[t.kind]) or t.id.removeprefix(prefixes[t.kind]) not in self.j.holds)]
        return stray[:limit], len(stray)

    async def stray_usage(self, since_ms, limit):
        stray = [u for u in self.j.usage.values() if u.hold_id not in self.j.holds and u.created_ms >= since_ms]
        return stray[:limit], len(stray)

    async def scan_accounts(self, each):
        rows = []
        posted = (domain.GRANT, domain.PAYMENT, domain.ADJUSTMENT, domain.POST)
        for account_id, account in sorted(self.j.accounts.items()):
            moves = [t for t in self.j.transfers.values() if t.kind in posted]
            rows.append(reconcile.AccountRow(
                account, sum(t.amount_nanos for t in moves if t.debit_account_id == account_id),
                sum(t.amount_nanos for t in moves if t.credit_account_id == account_id),
                sum(h.amount_nanos for h in self.j.holds.values()
                    if h.account_id == account_id and h.status == domain.PENDING)))
        await self._pages(rows, each)

    async def payments(self, since_ms, limit):
        rows = []
        for t in sorted(self.j.transfers.values(), key=lambda t: t.id):
            if t.kind == domain.PAYMENT and t.created_ms >= since_ms:
                topup = self.topups.get(t.id.removeprefix(reconcile.STRIPE_PREFIX))
                rows.append(reconcile.PaymentRow(t, topup.id, billing.SUCCEEDED, topup.amount_nanos, topup.account_id)
                            if topup else reconcile.PaymentRow(t))
        return rows[:limit]

    async def uncredited_topups(self, since_ms, limit):
        rows = [t for t in self.topups.values() if billing.transfer_id(t.payment_intent_id) not in self.j.transfers]
        return rows[:limit], len(rows)

    async def accounts_of_customers(self, customer_ids):
        return {c: self.customers[c] for c in customer_ids if c in self.customers}

    async def scan_settled_calls(self, since_ms, each):
        def call(u):
            found = [e for e in self.exports if e.transaction_id == reconcile.transaction_id(u)]
            return reconcile.SettledCall(u, min(found, key=lambda e: e.id, default=None), len(found))

        calls = [call(u) for u in self.j.usage.values() if u.outcome != domain.FAILED and u.created_ms >= since_ms]
        await self._pages(calls, each)

    async def stray_exports(self, since_ms, limit):
        settled = {reconcile.transaction_id(u) for u in self.j.usage.values() if u.outcome != domain.FAILED}
        rows = [e for e in self.exports if e.transaction_id not in settled]
        return rows[:limit], len(rows)

    def export_all(self) -> None:
        """The outbox as the store fills it: one event per settled call, sent."""
        self.exports = [reconcile.Export(i, reconcile.transaction_id(u), u.account_id, u.cost_nanos, "sent")
                        for i, u in enumerate(self.j.usage.values()) if u.outcome != domain.FAILED]


class FakeStripe:
    """reconcile.Intents: PaymentIntents as Stripe's API returns them, listed in pages of two."""

    def __init__(self) -> None:
        self.intents: dict[str, dict] = {}
        self.fail_after_pages: int | None = None
        self.lookups: list[str] = []

    def add(self, intent_id: str, *, cents: int, customer: str, account: str, status: str = "succeeded",
            created_ms: int = NOW_MS - 3_600_000, topup: str = "") -> None:
        self.intents[intent_id] = {"id": intent_id, "object": "payment_intent", "status": status, "amount": cents,
                                   "currency": "usd", "customer": customer, "created": created_ms // 1000,
                                   "metadata": {"account_id": account, "topup_id": topup or f"topup_{intent_id}"}}

    async def intent_pages(self, created_gte_s):
        listed = [i for i in self.intents.values() if i["created"] >= created_gte_s]
        for index, start in enumerate(range(0, len(listed), 2)):
            if self.fail_after_pages is not None and index >= self.fail_after_pages:
                raise ConnectionError("Stripe did not answer within 10 s")
            yield listed[start:start + 2]

    async def find_intent(self, intent_id):
        self.lookups.append(intent_id)
        return self.intents.get(intent_id)


def run(source, stripe=None, *, since_ms: int = 0, now_ms: int = NOW_MS, drifts_max: int = 1000,
        policy: reconcile.Policy = POLICY):
    async def collect():
        reconciler = reconcile.Reconciler(source, stripe, lambda: now_ms, policy)
        return [item async for item in reconciler.run(since_ms, drifts_max)]

    items = asyncio.run(collect())
    drifts = [i for i in items if isinstance(i, reconcile.Drift)]
    summaries = {i.kind: i for i in items if isinstance(i, reconcile.Summary)}
    assert list(summaries) == [reconcile.JOURNAL, reconcile.STRIPE, reconcile.LAGO]
    return drifts, summaries


def figures(summary: reconcile.Summary) -> dict[str, tuple]:
    return {f.name: (f.count, f.amount_nanos) for f in summary.figures}


def checks(drifts) -> set[tuple[str, str]]:
    return {(d.check, d.row) for d in drifts}


# --- an honest journal of every kind of call ---------------------------------------------

def busy_journal() -> tuple[Journal, dict[str, str]]:
    """Posted, failed, expired, settled after its expiry (posted and failed), pending, and
    capped at the hold: every state a hold can end in."""
    j = Journal()
    j.open("acct_a")
    j.open("acct_b")
    names = {}
    names["posted"] = j.hold("acct_a")
    j.settle(names["posted"], domain.Units(60, 200))
    names["failed"] = j.hold("acct_a")
    j.settle(names["failed"], domain.Units(), domain.FAILED)
    names["aborted"] = j.hold("acct_b")
    j.settle(names["aborted"], domain.Units(100, 17), domain.ABORTED)
    names["worst"] = j.hold("acct_b")
    j.settle(names["worst"], WORST)
    names["expired"] = j.hold("acct_a")
    names["late"] = j.hold("acct_b")
    names["late_failed"] = j.hold("acct_b")
    j.now += 11_000  # past the unclaimed lifetime
    j.expire_due()
    j.settle(names["late"], domain.Units(5, 5))
    j.settle(names["late_failed"], domain.Units(), domain.FAILED)
    names["pending"] = j.hold("acct_a")
    return j, names


def test_an_honest_journal_reconciles_with_its_figures():
    j, names = busy_journal()
    source = FakeSource(j)
    source.export_all()
    drifts, summaries = run(source, now_ms=j.now)
    assert drifts == []
    journal = summaries[reconcile.JOURNAL]
    posted = sum(t.amount_nanos for t in j.transfers.values() if t.kind == domain.POST)
    assert figures(journal)["calls"] == (8, None)
    assert figures(journal)["posted"] == (4, posted)
    assert figures(journal)["voided"][0] == 2 and figures(journal)["expired"][0] == 1
    assert figures(journal)["pending"] == (1, j.holds[names["pending"]].amount_nanos)
    assert figures(journal)["sum of balances"] == (None, 0)
    assert figures(journal)["customer balances"] == (None, 20 * USD - posted)
    assert (journal.status, summaries[reconcile.STRIPE].status) == (reconcile.OK, reconcile.OFF)
    assert figures(summaries[reconcile.LAGO])["settled calls"] == (4, posted)
    assert summaries[reconcile.LAGO].line().startswith("lago: ok; settled calls 4 $")
    assert journal.line().startswith("journal: ok; calls 8, posted 4 $0.00")


def test_the_debit_is_units_times_price_rounded_once_and_never_more_than_the_hold():
    # $0.0005 per million tokens: half a nano-dollar a token.
    cheap = {"input_per_million_tokens": 500_000, "output_per_million_tokens": 500_000}
    hold = domain.Hold("h", "acct", "k", "m", "r", cheap, 1, amount_nanos=1000, created_ms=0, expires_ms=1)
    # Rounded half up once per call: 0.5 + 0.5 is 1 (rounding each unit would make it 2).
    assert reconcile.expected_debit_nanos(hold, domain.Units(1, 1)) == 1
    assert reconcile.expected_debit_nanos(hold, domain.Units(3, 0)) == 2
    assert reconcile.expected_debit_nanos(hold, domain.Units(0, 10_000)) == 1000  # 5,000 capped at the hold


def test_a_charge_above_the_hold_is_capped_and_a_debit_above_it_is_a_drift():
    """A backend that reports more than was held: the ledger charges at most the hold."""
    j = Journal()
    j.open("acct_a")
    hold_id = j.hold("acct_a")
    j.settle(hold_id, domain.Units(100, 40_000))  # ten times the output the hold covers
    debit, held = j.transfers["post:" + hold_id].amount_nanos, j.holds[hold_id].amount_nanos
    drifts, _ = run(FakeSource(j), now_ms=j.now, policy=dataclasses.replace(POLICY, lago_on=False))
    # The ledger caps the charge at the hold: the debit is the hold, and that reconciles.
    assert debit == held and drifts == []
    # A debit above the hold (a ledger that did not cap it) is a drift.
    post = j.transfers["post:" + hold_id]
    j.transfers[post.id] = dataclasses.replace(post, amount_nanos=held + 1)
    drifts, _ = run(FakeSource(j), now_ms=j.now, policy=dataclasses.replace(POLICY, lago_on=False))
    assert ("debit_mismatch", f"hold:{hold_id}") in checks(drifts)


# --- every corruption is found ------------------------------------------------------------

def _zero_units(j: Journal, n: dict) -> str:
    u = j.usage[n["posted"]]
    j.usage[n["posted"]] = dataclasses.replace(u, units=domain.Units())
    return "debit_mismatch", f"hold:{n['posted']}"


def _more_units(j: Journal, n: dict) -> str:
    u = j.usage[n["aborted"]]
    more = dataclasses.replace(u.units, output_tokens=u.units.output_tokens + 1)
    j.usage[n["aborted"]] = dataclasses.replace(u, units=more)
    return "debit_mismatch", f"hold:{n['aborted']}"


def _debit_plus_one(j: Journal, n: dict) -> str:
    t = j.transfers["post:" + n["posted"]]
    j.transfers[t.id] = dataclasses.replace(t, amount_nanos=t.amount_nanos + 1)
    return "debit_mismatch", f"hold:{n['posted']}"


def _usage_cost(j: Journal, n: dict) -> str:
    u = j.usage[n["late"]]
    j.usage[n["late"]] = dataclasses.replace(u, cost_nanos=u.cost_nanos - 1)
    return "usage_cost_mismatch", f"hold:{n['late']}"


def _usage_gone(j: Journal, n: dict) -> str:
    del j.usage[n["worst"]]
    return "usage_missing", f"hold:{n['worst']}"


def _post_gone(j: Journal, n: dict) -> str:
    del j.transfers["post:" + n["posted"]]
    return "post_missing", f"hold:{n['posted']}"


def _voided_too(j: Journal, n: dict) -> str:
    hold = j.holds[n["posted"]]
    j.transfers["void:" + hold.id] = domain.Transfer("void:" + hold.id, domain.VOID, hold.account_id,
                                                     domain.SYS_REVENUE, hold.amount_nanos, hold.transfer_id)
    return "settled_twice", f"hold:{n['posted']}"


def _failed_but_charged(j: Journal, n: dict) -> str:
    u = j.usage[n["failed"]]
    j.usage[n["failed"]] = dataclasses.replace(u, cost_nanos=5)
    return "usage_cost_mismatch", f"hold:{n['failed']}"


def _hold_transfer_amount(j: Journal, n: dict) -> str:
    t = j.transfers["hold:" + n["pending"]]
    j.transfers[t.id] = dataclasses.replace(t, amount_nanos=1)
    return "hold_transfer_mismatch", f"hold:{n['pending']}"


def _balance_off(j: Journal, n: dict) -> str:
    j.accounts["acct_b"].credits_posted += 1
    return "balance_mismatch", "account:acct_b"


def _held_off(j: Journal, n: dict) -> str:
    j.accounts["acct_a"].debits_pending -= 1
    return "held_mismatch", "account:acct_a"


def _unbalanced(j: Journal, n: dict) -> str:
    j.accounts[domain.SYS_GRANTS].debits_posted -= 7  # money from nowhere, on a system account
    return "debits_differ_from_credits", "journal"


def _lapsed_but_pending(j: Journal, n: dict) -> str:
    j.now += 60_000  # the sweep never ran: the pending hold outlived its expiry by far
    return "pending_past_expiry", f"hold:{n['pending']}"


def _expired_not_released(j: Journal, n: dict) -> str:
    del j.transfers["expire:" + n["expired"]]
    return "expire_missing", f"hold:{n['expired']}"


def _usage_of_no_hold(j: Journal, n: dict) -> str:
    j.usage["ghost"] = dataclasses.replace(j.usage[n["posted"]], hold_id="ghost")
    return "usage_without_hold", "usage:ghost"


def _post_of_no_hold(j: Journal, n: dict) -> str:
    j.transfers["post:ghost"] = dataclasses.replace(j.transfers["post:" + n["posted"]], id="post:ghost")
    return "transfer_without_hold", "transfer:post:ghost"


def _status_flipped(j: Journal, n: dict) -> str:
    j.holds[n["expired"]].status = domain.POSTED
    return "post_missing", f"hold:{n['expired']}"


CORRUPTIONS = [_zero_units, _more_units, _debit_plus_one, _usage_cost, _usage_gone, _post_gone, _voided_too,
               _failed_but_charged, _hold_transfer_amount, _balance_off, _held_off, _unbalanced, _lapsed_but_pending,
               _expired_not_released, _usage_of_no_hold, _post_of_no_hold, _status_flipped]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_each_corruption_of_the_journal_is_found_and_its_row_named(corrupt):
    j, names = busy_journal()
    expected = corrupt(j, names)
    drifts, summaries = run(FakeSource(j), now_ms=j.now, policy=dataclasses.replace(POLICY, lago_on=False))
    assert expected in checks(drifts), drifts
    assert summaries[reconcile.JOURNAL].status == reconcile.DRIFT
    assert summaries[reconcile.JOURNAL].drifts == len(drifts)


@st.composite
def honest_calls(draw):
    """A journal after a random mix of calls, each settled within what it held (or not at all)."""
    j = Journal()
    accounts = ["acct_a", "acct_b", "acct_c"][:draw(st.integers(1, 3))]
    for account in accounts:
        j.open(account)
    for _ in range(draw(st.integers(0, 25))):
        action = draw(st.sampled_from(["call", "call", "failed", "abandoned", "tick", "credit"]))
        account = draw(st.sampled_from(accounts))
        if action == "tick":
            j.now += draw(st.integers(0, 30_000))
            j.expire_due()
        elif action == "credit":
            j.credit(account, draw(st.integers(1, 5 * USD)), f"adj-{len(j.transfers)}", domain.ADJUSTMENT)
        elif j.accounts[account].available_nanos > 0:
            worst = domain.Units(draw(st.integers(0, 10_000)), draw(st.integers(1, 100_000)))
            hold_id = j.hold(account, worst)
            if action != "abandoned":
                units = domain.Units(draw(st.integers(0, worst.input_tokens)),
                                     draw(st.integers(0, worst.output_tokens)))
                outcome = domain.FAILED if action == "failed" else draw(st.sampled_from([domain.COMPLETED,
                                                                                         domain.ABORTED]))
                j.now += draw(st.integers(0, 20_000))
                j.expire_due()  # the sweep runs while the call does: the settlement may come after a lapse
                j.settle(hold_id, units if outcome != domain.FAILED else domain.Units(), outcome)
    return j


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(journal=honest_calls(), corrupt=st.sampled_from([None, "units", "debit", "balance"]))
def test_random_honest_journals_reconcile_and_a_corrupted_one_does_not(journal, corrupt):
    posted = [h for h in journal.holds.values() if h.status == domain.POSTED and h.cost_nanos > 0]
    if corrupt == "units" and posted:
        u = journal.usage[posted[0].id]
        journal.usage[posted[0].id] = dataclasses.replace(u, units=domain.Units())
    elif corrupt == "debit" and posted:
        t = journal.transfers["post:" + posted[0].id]
        journal.transfers[t.id] = dataclasses.replace(t, amount_nanos=t.amount_nanos - 1)
    elif corrupt == "balance":
        journal.accounts["acct_a"].debits_posted += 1
    source = FakeSource(journal)
    source.export_all()
    drifts, summaries = run(source, now_ms=journal.now)
    planted = corrupt == "balance" or (corrupt is not None and posted)
    assert bool(drifts) == bool(planted), drifts
    if corrupt in ("units", "debit") and posted:
        assert ("debit_mismatch", f"hold:{posted[0].id}") in checks(drifts)
    assert summaries[reconcile.JOURNAL].drifts == len([d for d in drifts if d.kind == reconcile.JOURNAL])
    balances = sum(a.balance_nanos for a in journal.accounts.values())
    assert figures(summaries[reconcile.JOURNAL])["sum of balances"] == (None, balances)


def test_only_the_first_rows_are_listed_and_every_drift_is_counted():
    j, names = busy_journal()
    for key in ("posted", "aborted", "worst", "late"):
        u = j.usage[names[key]]
        j.usage[names[key]] = dataclasses.replace(u, units=domain.Units(0, 0), cost_nanos=0)
    j.accounts["acct_a"].credits_posted += 1
    drifts, summaries = run(FakeSource(j), now_ms=j.now, drifts_max=3,
                            policy=dataclasses.replace(POLICY, lago_on=False))
    assert len(drifts) == 3
    assert summaries[reconcile.JOURNAL].drifts > 3
    assert "drifting" in summaries[reconcile.JOURNAL].line()


def test_since_limits_the_calls_but_not_the_balances():
    j, names = busy_journal()
    _zero_units(j, names)  # an old call
    j.now += 60_000
    later = j.now
    fresh = j.hold("acct_a")
    j.settle(fresh, domain.Units(1, 1))
    drifts, summaries = run(FakeSource(j), since_ms=later, now_ms=j.now,
                            policy=dataclasses.replace(POLICY, lago_on=False))
    assert drifts == [] and figures(summaries[reconcile.JOURNAL])["calls"] == (1, None)
    assert "since 2026-01-01T00:01" in summaries[reconcile.JOURNAL].note
    j.accounts["acct_b"].debits_posted += 3
    drifts, _ = run(FakeSource(j), since_ms=later, now_ms=j.now, policy=dataclasses.replace(POLICY, lago_on=False))
    assert ("balance_mismatch", "account:acct_b") in checks(drifts)


# --- stripe -----------------------------------------------------------------------------

def paid_journal() -> tuple[Journal, FakeSource, FakeStripe]:
    """Two top-ups credited from their PaymentIntents, as billing does it."""
    j = Journal()
    j.open("acct_a")
    source, stripe = FakeSource(j), FakeStripe()
    source.customers["cus_a"] = "acct_a"
    for intent_id, cents in (("pi_1", 500), ("pi_2", 1234)):
        stripe.add(intent_id, cents=cents, customer="cus_a", account="acct_a")
        j.credit("acct_a", cents * billing.NANOS_PER_CENT, billing.transfer_id(intent_id))
        source.topups[intent_id] = reconcile.TopupRow(f"topup_{intent_id}", "acct_a", cents * billing.NANOS_PER_CENT,
                                                      intent_id)
    return j, source, stripe


def test_credited_top_ups_match_their_payment_intents():
    j, source, stripe = paid_journal()
    stripe.add("pi_foreign", cents=900, customer="cus_other", account="acct_elsewhere")  # another system's
    stripe.add("pi_young", cents=700, customer="cus_a", account="acct_a", created_ms=NOW_MS - 5_000)  # event on its way
    stripe.add("pi_declined", cents=800, customer="cus_a", account="acct_a", status="requires_payment_method")
    drifts, summaries = run(source, stripe, now_ms=NOW_MS)
    assert drifts == []
    assert figures(summaries[reconcile.STRIPE]) == {
        "credited": (2, 1734 * billing.NANOS_PER_CENT), "payment intents": (5, None), "awaiting credit": (1, None),
        "not ours": (1, None)}
    assert summaries[reconcile.STRIPE].line() == ("stripe: ok; credited 2 $17.34, payment intents 5, "
                                                  "awaiting credit 1, not ours 1")


def test_a_top_up_credited_without_a_payment_intent_is_found():
    j, source, stripe = paid_journal()
    j.credit("acct_a", 50 * USD, "stripe:pi_invented")
    j.credit("acct_a", 7 * USD, "pi_without_prefix")
    drifts, summaries = run(source, stripe, now_ms=NOW_MS)
    assert checks(drifts) == {("credited_without_intent", "transfer:stripe:pi_invented"),
                              ("topup_missing", "transfer:stripe:pi_invented"),
                              ("payment_without_intent", "transfer:pi_without_prefix")}
    assert stripe.lookups == ["pi_invented"]  # the malformed one is not looked up
    assert summaries[reconcile.STRIPE].status == reconcile.DRIFT and summaries[reconcile.STRIPE].drifts == 3


def test_a_payment_intent_older_than_the_listing_is_fetched_and_checked():
    j, source, stripe = paid_journal()
    stripe.intents["pi_1"]["created"] = (NOW_MS - 30 * 86_400_000) // 1000
    stripe.intents["pi_1"]["amount"] = 400
    drifts, _ = run(source, stripe, since_ms=NOW_MS - 86_400_000, now_ms=NOW_MS)
    assert stripe.lookups == ["pi_1"]
    assert checks(drifts) == {("amount_mismatch", "payment_intent:pi_1")}


@pytest.mark.parametrize("case", ["amount", "status", "account", "uncredited", "uncredited_other_customer",
                                  "topup_row"])
def test_each_stripe_disagreement_is_found(case):
    j, source, stripe = paid_journal()
    expected = {
        "amount": ("amount_mismatch", "payment_intent:pi_2"),
        "status": ("credited_not_succeeded", "payment_intent:pi_2"),
        "account": ("account_mismatch", "payment_intent:pi_2"),
        "uncredited": ("succeeded_not_credited", "payment_intent:pi_3"),
        "uncredited_other_customer": ("succeeded_not_credited", "payment_intent:pi_3"),
        "topup_row": ("topup_without_credit", "topup:topup_pi_9"),
    }[case]
    if case == "amount":
        stripe.intents["pi_2"]["amount"] = 1233
    elif case == "status":
        stripe.intents["pi_2"]["status"] = "canceled"
    elif case == "account":
        stripe.intents["pi_2"]["metadata"]["account_id"] = "acct_b"
    elif case == "uncredited":
        stripe.add("pi_3", cents=500, customer="cus_a", account="acct_a")
    elif case == "uncredited_other_customer":
        source.customers["cus_b"] = "acct_b"
        stripe.add("pi_3", cents=500, customer="cus_b", account="acct_a")
    else:
        source.topups["pi_9"] = reconcile.TopupRow("topup_pi_9", "acct_a", 5 * USD, "pi_9")
    drifts, summaries = run(source, stripe, now_ms=NOW_MS)
    assert checks(drifts) == {expected}
    assert summaries[reconcile.STRIPE].drifts == 1


def test_stripe_unreachable_or_too_much_is_an_incomplete_check(monkeypatch):
    j, source, stripe = paid_journal()
    stripe.fail_after_pages = 0
    drifts, summaries = run(source, stripe, now_ms=NOW_MS)
    assert [(d.check, d.row) for d in drifts] == [("incomplete", "stripe")]
    assert "did not answer" in drifts[0].detail and summaries[reconcile.STRIPE].status == reconcile.DRIFT
    stripe.fail_after_pages = None
    for n in range(4):
        stripe.add(f"pi_x{n}", cents=500, customer="cus_other", account="acct_z")
    monkeypatch.setattr(reconcile, "INTENTS_MAX", 5)
    drifts, _ = run(source, stripe, now_ms=NOW_MS)
    assert [(d.check, d.row) for d in drifts] == [("incomplete", "stripe")]
    assert "narrow it with --since" in drifts[0].detail


# --- lago -------------------------------------------------------------------------------

def test_lago_off_says_so():
    j, _names = busy_journal()
    _drifts, summaries = run(FakeSource(j), now_ms=j.now, policy=dataclasses.replace(POLICY, lago_on=False))
    assert summaries[reconcile.LAGO].line() == "lago: off"


@pytest.mark.parametrize("case", ["amount", "missing", "twice", "failed", "stray", "account", "queued"])
def test_each_lago_disagreement_is_found(case):
    j, names = busy_journal()
    source = FakeSource(j)
    source.export_all()
    txn = f"req-{names['posted']}"
    index = next(i for i, e in enumerate(source.exports) if e.transaction_id == txn)
    export = source.exports[index]
    expected = {"amount": "export_amount_mismatch", "missing": "not_exported", "twice": "duplicate_transaction_id",
                "failed": "export_failed", "stray": "exported_not_settled", "account": "export_account_mismatch",
                "queued": None}[case]
    if case == "amount":
        source.exports[index] = dataclasses.replace(export, cost_nanos=export.cost_nanos + 10)
    elif case == "missing":
        del source.exports[index]
    elif case == "twice":
        source.exports.append(dataclasses.replace(export, id=99))
    elif case == "failed":
        source.exports[index] = dataclasses.replace(export, status="failed", attempts=10, last_error="HTTP 500")
    elif case == "stray":
        txn = f"req-{names['failed']}"  # a failed call costs nothing and is never exported
        source.exports.append(dataclasses.replace(export, id=99, transaction_id=txn))
    elif case == "account":
        source.exports[index] = dataclasses.replace(export, account_id="acct_b")
    else:
        source.exports[index] = dataclasses.replace(export, status="pending")
    drifts, summaries = run(source, now_ms=j.now)
    if expected is None:
        assert drifts == [] and figures(summaries[reconcile.LAGO])["queued"] == (1, None)
        return
    assert checks(drifts) == {(expected, f"lago:{txn}")}
    assert summaries[reconcile.LAGO].status == reconcile.DRIFT


def test_lago_is_checked_over_the_outbox_week_at_most():
    j, names = busy_journal()
    source = FakeSource(j)  # nothing exported: every call would be missing
    later = j.now + 8 * 86_400_000
    drifts, summaries = run(source, now_ms=later)
    assert [d for d in drifts if d.kind == reconcile.LAGO] == []
    assert "the outbox keeps a week" in summaries[reconcile.LAGO].note
