"""The journal's rules (ledger_svc.domain.Book) against a plain oracle, step by step.

A Hypothesis state machine drives an in-memory journal (the same Book the SQL
store uses, kept in dictionaries) with signups, payments, adjustments, holds,
settlements, claims, expiries and replays, and compares it after every step with an
oracle that only keeps a dict of balances and a dict of pending holds.
"""
import dataclasses

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from common import pricing
from ledger_svc import domain

pytestmark = pytest.mark.timeout(300)

USD = 1_000_000_000
SIGNUP = 10 * USD
LOW = 5 * USD
TTL_MS = 60_000
# A hold no router claimed lapses after this; a claimed one after TTL_MS from its creation.
CLAIM_MS = 10_000
PRICES = {"input_per_million_tokens": 500_000_000, "output_per_million_tokens": 1_500_000_000}
ACCOUNTS = ("acct-a", "acct-b", "acct-c")
SYSTEM = domain.SYSTEM_ACCOUNTS


class MemoryJournal:
    """A fake store: the domain's Book over dictionaries that live as long as the journal."""

    def __init__(self) -> None:
        self.accounts = {account_id: domain.Account(account_id, kind=domain.SYSTEM) for account_id in SYSTEM}
        self.holds: dict[str, domain.Hold] = {}
        self.transfers: dict[str, domain.Transfer] = {}
        self.usage: list[domain.UsageRow] = []
        self.notices: list[domain.Notice] = []
        self.policy = domain.Policy(low_balance_nanos=LOW, hold_ttl_ms=TTL_MS, unclaimed_ttl_ms=CLAIM_MS)

    def _book(self) -> domain.Book:
        return domain.Book(self.accounts, self.holds, self.policy)

    def _commit(self, book: domain.Book) -> None:
        book.assert_balanced()
        for transfer in book.transfers:
            assert transfer.id not in self.transfers, f"transfer id {transfer.id} written twice"
            self.transfers[transfer.id] = transfer
        self.usage.extend(book.usage)
        self.notices.extend(book.notices)

    def open_account(self, account_id: str, now: int) -> domain.TransferResult:
        if account_id not in self.accounts:
            self.accounts[account_id] = domain.Account(account_id, email=f"{account_id}@example.com")
        grant = domain.signup_grant(account_id, SIGNUP, now)
        book = self._book()
        result = book.post_transfer(grant, self.transfers.get(grant.id))
        self._commit(book)
        return result

    def credit(self, account_id: str, amount: int, transfer_id: str, kind: str, now: int) -> domain.TransferResult:
        rejected = domain.check_credit(transfer_id, kind, amount, "test")
        if rejected is not None:
            return rejected
        transfer = domain.credit_transfer(account_id, amount, transfer_id, "test", kind, now)
        book = self._book()
        result = book.post_transfer(transfer, self.transfers.get(transfer_id))
        self._commit(book)
        return result

    def hold(self, request: domain.HoldRequest, now: int) -> domain.HoldDecision:
        book = self._book()
        decision = book.hold(request, now)
        self._commit(book)
        return decision

    def settle(self, settlement: domain.Settlement, now: int) -> domain.SettleResult:
        book = self._book()
        result = book.settle(settlement, now)
        self._commit(book)
        return result

    def claim(self, hold_id: str, now: int) -> bool:
        book = self._book()
        claimed = book.claim(hold_id, now)
        self._commit(book)
        return claimed

    def expire(self, now: int) -> int:
        book = self._book()
        count = sum(book.expire(hold_id, now) for hold_id in list(self.holds))
        self._commit(book)
        return count

    def snapshot(self) -> tuple:
        return (tuple(sorted((a.id, dataclasses.astuple(a)) for a in self.accounts.values())),
                tuple(sorted((h.id, h.status, h.cost_nanos) for h in self.holds.values())),
                len(self.transfers), len(self.usage), len(self.notices))


@dataclasses.dataclass
class OracleHold:
    account_id: str
    amount: int
    expires_ms: int
    created_ms: int = 0
    status: str = domain.PENDING
    settlement: domain.Settlement | None = None
    request: domain.HoldRequest | None = None


units_strategy = st.builds(domain.Units, input_tokens=st.integers(0, 2_000_000),
                           output_tokens=st.integers(0, 2_000_000))


class JournalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.journal = MemoryJournal()
        self.now = 1_700_000_000_000
        self.balances = {account_id: 0 for account_id in SYSTEM}
        self.held: dict[str, int] = {}
        self.opened: set[str] = set()
        self.credits: dict[str, domain.Transfer] = {}
        self.holds: dict[str, OracleHold] = {}
        self.max_hold: dict[str, int] = {}
        # Accounts whose balance may legitimately sink further than one hold below zero: a
        # negative adjustment (a settlement never charges more than its hold).
        self.unbounded: set[str] = set()
        self.armed = {}  # account -> (low armed, zero armed)
        self.expected_notices: list[tuple[str, str]] = []
        self.last = None
        self.hold_counter = 0

    @initialize()
    def start(self) -> None:
        self.open(ACCOUNTS[0])

    # --- oracle helpers ---

    def _post(self, account_id: str, delta: int, system: str) -> None:
        before = self.balances[account_id]
        self.balances[account_id] += delta
        self.balances[system] -= delta
        after = self.balances[account_id]
        low_armed, zero_armed = self.armed[account_id]
        if after > before:
            low_armed = low_armed or after >= LOW
            zero_armed = zero_armed or after > 0
        elif after < before:
            if after <= 0 and zero_armed:
                zero_armed = low_armed = False
                self.expected_notices.append((account_id, domain.ZERO))
            elif after < LOW and low_armed:
                low_armed = False
                self.expected_notices.append((account_id, domain.LOW))
        self.armed[account_id] = (low_armed, zero_armed)

    # --- rules ---

    @rule(account_id=st.sampled_from(ACCOUNTS))
    def open(self, account_id: str) -> None:
        result = self.journal.open_account(account_id, self.now)
        if account_id in self.opened:
            assert result is domain.TransferResult.EXISTS
        else:
            assert result is domain.TransferResult.CREATED
            self.opened.add(account_id)
            self.balances[account_id] = 0
            self.held[account_id] = 0
            self.armed[account_id] = (True, True)
            self._post(account_id, SIGNUP, domain.SYS_GRANTS)
        self.last = ("open", (account_id,), result)

    def _amount(self, account_id: str, amount: int | str) -> int:
        """Random amounts rarely land on a line exactly; these do: to zero, to the low line."""
        if isinstance(amount, int):
            return amount
        balance = self.balances.get(account_id, 0)
        available = balance - self.held.get(account_id, 0)
        return {"-available": -available, "available": available, "-balance": -balance,
                "to-low": LOW - balance, "below-low": LOW - balance - 1}[amount]

    exact = st.sampled_from(["-available", "available", "-balance", "to-low", "below-low"])

    @rule(account_id=st.sampled_from(ACCOUNTS), kind=st.sampled_from(domain.CREDIT_KINDS),
          amount=st.one_of(st.integers(-15 * USD, 15 * USD), exact),
          transfer_id=st.sampled_from([*(f"t{i}" for i in range(16)), "post:x", ""]))
    def credit(self, account_id: str, kind: str, amount: int | str, transfer_id: str) -> None:
        amount = self._amount(account_id, amount)
        result = self.journal.credit(account_id, amount, transfer_id, kind, self.now)
        self._check_credit(account_id, kind, amount, transfer_id, result)
        self.last = ("credit", (account_id, kind, amount, transfer_id), result)

    @rule(account_id=st.sampled_from(ACCOUNTS), to=st.sampled_from([-USD, 0, 1, LOW - 1, LOW, LOW + 1, 2 * LOW]))
    def move_balance_to(self, account_id: str, to: int) -> None:
        """An adjustment (fresh id) that puts the balance exactly on or beside a line: crossings."""
        self.hold_counter += 1
        amount = to - self.balances.get(account_id, 0)
        transfer_id = f"move-{self.hold_counter}"
        result = self.journal.credit(account_id, amount, transfer_id, domain.ADJUSTMENT, self.now)
        self._check_credit(account_id, domain.ADJUSTMENT, amount, transfer_id, result)
        self.last = ("credit", (account_id, domain.ADJUSTMENT, amount, transfer_id), result)

    def _check_credit(self, account_id, kind, amount, transfer_id, result) -> None:
        expected = domain.check_credit(transfer_id, kind, amount, "test")
        if expected is not None:
            assert result is expected
            return
        new = domain.credit_transfer(account_id, amount, transfer_id, "test", kind, self.now)
        old = self.credits.get(transfer_id)
        if old is not None:
            # The first field that differs names the rejection; none: an idempotent replay.
            rungs = [(old.kind != new.kind, domain.TransferResult.EXISTS_WITH_DIFFERENT_KIND),
                     (old.debit_account_id != new.debit_account_id,
                      domain.TransferResult.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID),
                     (old.credit_account_id != new.credit_account_id,
                      domain.TransferResult.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID),
                     (old.amount_nanos != new.amount_nanos, domain.TransferResult.EXISTS_WITH_DIFFERENT_AMOUNT),
                     (True, domain.TransferResult.EXISTS)]
            assert result is next(rung for differs, rung in rungs if differs)
            return
        if account_id not in self.opened:
            assert result in (domain.TransferResult.DEBIT_ACCOUNT_NOT_FOUND,
                              domain.TransferResult.CREDIT_ACCOUNT_NOT_FOUND)
            return
        assert result is domain.TransferResult.CREATED
        self.credits[transfer_id] = new
        if amount < 0:
            self.unbounded.add(account_id)
        self._post(account_id, amount, domain.SYS_PAYMENTS if kind == domain.PAYMENT else domain.SYS_ADJUSTMENTS)

    @rule(account_id=st.sampled_from(ACCOUNTS), amount=st.one_of(st.integers(0, 3 * USD), exact),
          reuse=st.booleans())
    def hold(self, account_id: str, amount: int | str, reuse: bool) -> None:
        amount = max(0, self._amount(account_id, amount))
        if reuse and self.holds:
            hold_id = sorted(self.holds)[amount % len(self.holds)]
        else:
            self.hold_counter += 1
            hold_id = f"h{self.hold_counter}"
        request = domain.HoldRequest(hold_id=hold_id, account_id=account_id, key_id="k", model="m",
                                     request_id="r-" + hold_id, prices=PRICES, price_version=1, amount_nanos=amount)
        decision = self.journal.hold(request, self.now)
        self._check_hold(request, decision)
        self.last = ("hold", (request,), decision.result)

    def _check_hold(self, request: domain.HoldRequest, decision: domain.HoldDecision) -> None:
        known = self.holds.get(request.hold_id)
        if known is not None:
            same = known.request == request
            expected = domain.HoldResult.EXISTS if same else domain.HoldResult.EXISTS_WITH_DIFFERENT_FIELDS
            assert decision.result is expected
            return
        if request.account_id not in self.opened:
            assert decision.result is domain.HoldResult.ACCOUNT_NOT_FOUND
            return
        available = self.balances[request.account_id] - self.held[request.account_id]
        if available <= 0:
            assert decision.result is domain.HoldResult.INSUFFICIENT_CREDIT
            return
        assert decision.result is domain.HoldResult.ADMITTED
        self.held[request.account_id] += request.amount_nanos
        self.max_hold[request.account_id] = max(self.max_hold.get(request.account_id, 0), request.amount_nanos)
        self.holds[request.hold_id] = OracleHold(request.account_id, request.amount_nanos, self.now + CLAIM_MS,
                                                 created_ms=self.now,
                                                 request=request)

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data(), outcome=st.sampled_from(domain.OUTCOMES), units=units_strategy,
          within_hold=st.booleans())
    def settle(self, data, outcome: str, units: domain.Units, within_hold: bool) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.holds)))
        known = self.holds[hold_id]
        if within_hold:
            # Scale the units down until the charge fits in the hold (the usual case).
            while units != domain.Units() and pricing.cost_nanos(PRICES, units.as_usage()) > known.amount:
                units = domain.Units(units.input_tokens // 2, units.output_tokens // 2)
        settlement = domain.Settlement(hold_id=hold_id, units=units, outcome=outcome, request_id="r-" + hold_id,
                                       ended_ms=self.now)
        result = self.journal.settle(settlement, self.now)
        self._check_settle(settlement, result)
        self.last = ("settle", (settlement,), result.status)

    def _check_settle(self, settlement: domain.Settlement, result: domain.SettleResult) -> None:
        known = self.holds.get(settlement.hold_id)
        if known is None:
            assert result.status is domain.SettleStatus.UNKNOWN_HOLD
            return
        if known.settlement is not None:
            same = known.settlement == settlement
            assert result.status is (domain.SettleStatus.DUPLICATE if same else domain.SettleStatus.CONFLICT)
            return
        cost = 0 if settlement.outcome == domain.FAILED else pricing.cost_nanos(PRICES, settlement.units.as_usage())
        [row] = self.journal.usage[-1:]
        assert (row.hold_id, row.cost_nanos) == (settlement.hold_id, result.cost_nanos)
        if cost > known.amount:
            # Never more than the hold: the units are cut (output first) to the most that fits,
            # the usage row says which, and they price to exactly what was charged.
            assert result.capped and result.cost_nanos <= known.amount
            assert row.units.output_tokens <= settlement.units.output_tokens
            assert row.units.input_tokens <= settlement.units.input_tokens
            assert row.units.input_tokens == settlement.units.input_tokens or row.units.output_tokens == 0
            assert pricing.cost_nanos(PRICES, row.units.as_usage()) == result.cost_nanos
            # The most that fits: one more token of the field that was cut would not.
            assert known.amount - result.cost_nanos < max(PRICES.values()) // 1_000_000
            cost = result.cost_nanos
        else:
            assert not result.capped and row.units == settlement.units
        assert result.cost_nanos == cost
        if known.status == domain.PENDING:
            self.held[known.account_id] -= known.amount
        if settlement.outcome != domain.FAILED:
            self._post(known.account_id, -cost, domain.SYS_REVENUE)
        known.status = domain.VOIDED if settlement.outcome == domain.FAILED else domain.POSTED
        known.settlement = settlement
        assert result.status.value == known.status

    @rule(hold_id=st.sampled_from(["nope", ""]))
    def settle_unknown(self, hold_id: str) -> None:
        settlement = domain.Settlement(hold_id=hold_id, units=domain.Units(1, 1), outcome=domain.COMPLETED)
        result = self.journal.settle(settlement, self.now)
        expected = domain.SettleStatus.UNKNOWN_HOLD if hold_id else domain.SettleStatus.HOLD_ID_MUST_NOT_BE_EMPTY
        assert result.status is expected

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def claim(self, data) -> None:
        """A router runs the call: a pending hold lives TTL_MS from the claim (a renewal
        extends it again); any other hold is left as it is, and none is ever shortened."""
        hold_id = data.draw(st.sampled_from(sorted(self.holds) + ["nope"]))
        before = self.journal.snapshot()
        claimed = self.journal.claim(hold_id, self.now)
        known = self.holds.get(hold_id)
        extends = known is not None and known.status == domain.PENDING and known.expires_ms < self.now + TTL_MS
        assert claimed == extends
        if extends:
            known.expires_ms = self.now + TTL_MS
        assert self.journal.snapshot() == before, "a claim moves no money"
        if known is not None and hold_id in self.journal.holds:
            assert self.journal.holds[hold_id].expires_ms == known.expires_ms

    @rule(ms=st.sampled_from([1, 1_000, CLAIM_MS + 1, TTL_MS // 2, TTL_MS + 1]))
    def tick(self, ms: int) -> None:
        self.now += ms
        expired = self.journal.expire(self.now)
        due = [h for h in self.holds.values() if h.status == domain.PENDING and h.expires_ms <= self.now]
        assert expired == len(due)
        for known in due:
            known.status = domain.EXPIRED
            self.held[known.account_id] -= known.amount
        self.last = None

    @precondition(lambda self: self.last is not None)
    @rule()
    def replay(self) -> None:
        """The same operation again, with the same ids and fields, changes nothing: what was
        created now "exists", and what was refused is refused the same way."""
        before = self.journal.snapshot()
        kind, args, first = self.last
        if kind == "open":
            again = self.journal.open_account(args[0], self.now)
        elif kind == "credit":
            account_id, credit_kind, amount, transfer_id = args
            again = self.journal.credit(account_id, amount, transfer_id, credit_kind, self.now)
        elif kind == "hold":
            again = self.journal.hold(args[0], self.now).result
        else:
            again = self.journal.settle(args[0], self.now).status
        created = {domain.TransferResult.CREATED: domain.TransferResult.EXISTS,
                   domain.HoldResult.ADMITTED: domain.HoldResult.EXISTS,
                   domain.SettleStatus.POSTED: domain.SettleStatus.DUPLICATE,
                   domain.SettleStatus.VOIDED: domain.SettleStatus.DUPLICATE}
        assert again is created.get(first, first)
        assert self.journal.snapshot() == before

    # --- invariants ---

    @invariant()
    def debits_equal_credits(self) -> None:
        accounts = self.journal.accounts.values()
        assert sum(a.balance_nanos for a in accounts) == 0
        assert sum(a.debits_pending for a in accounts) == sum(a.credits_pending for a in accounts)

    @invariant()
    def balances_match_the_oracle(self) -> None:
        for account_id, balance in self.balances.items():
            account = self.journal.accounts[account_id]
            assert account.balance_nanos == balance, account_id
        for account_id in self.opened:
            account = self.journal.accounts[account_id]
            assert account.held_nanos == self.held[account_id]
            assert account.available_nanos == account.balance_nanos - account.held_nanos

    @invariant()
    def holds_are_never_negative(self) -> None:
        for account in self.journal.accounts.values():
            assert account.debits_pending >= 0 and account.credits_pending >= 0
        for account_id in self.opened:
            pending = sum(h.amount_nanos for h in self.journal.holds.values()
                          if h.account_id == account_id and h.status == domain.PENDING)
            assert pending == self.journal.accounts[account_id].held_nanos

    @invariant()
    def below_zero_by_at_most_one_hold(self) -> None:
        for account_id in self.opened - self.unbounded:
            floor = -self.max_hold.get(account_id, 0)
            account = self.journal.accounts[account_id]
            assert account.balance_nanos >= floor
            assert account.available_nanos >= floor

    @invariant()
    def notices_once_per_crossing(self) -> None:
        assert [(n.account_id, n.kind) for n in self.journal.notices] == self.expected_notices


JournalMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
test_journal_against_oracle = JournalMachine.TestCase


def test_crossing_rules() -> None:
    account = domain.Account("a", credits_posted=6 * USD)
    account.debits_posted = 2 * USD  # 6 -> 4: below the line
    assert domain.crossing(account, 6 * USD, LOW) == domain.LOW
    account.debits_posted = 3 * USD  # 4 -> 3: already told
    assert domain.crossing(account, 4 * USD, LOW) is None
    account.debits_posted = 6 * USD  # 3 -> 0: reached zero
    assert domain.crossing(account, 3 * USD, LOW) == domain.ZERO
    account.credits_posted = 8 * USD  # 0 -> 2: zero armed again, low not yet
    assert domain.crossing(account, 0, LOW) is None
    assert (account.low_notified, account.zero_notified) == (True, False)
    account.debits_posted = 8 * USD  # 2 -> 0
    assert domain.crossing(account, 2 * USD, LOW) == domain.ZERO
    account.credits_posted = 20 * USD  # 0 -> 12: both armed
    assert domain.crossing(account, 0, LOW) is None
    account.debits_posted = 21 * USD  # 12 -> -1: straight through both lines, one notice
    assert domain.crossing(account, 12 * USD, LOW) == domain.ZERO
    assert (account.low_notified, account.zero_notified) == (True, True)


def test_price_book_versions() -> None:
    book = domain.PriceBook([domain.PriceVersion.of("m", 1, 100, {"per_image": 5}),
                             domain.PriceVersion.of("m", 2, 200, {"per_image": 7}),
                             domain.PriceVersion.of("m", 3, 150, {"per_image": 6})])
    assert book.current("m", 99) is None
    assert book.current("m", 100).version == 1
    assert book.current("m", 170).version == 3
    assert book.current("m", 250).version == 2
    assert book.next_version("m") == 4
    assert domain.price_changes(book, {"m": {"per_image": 7}, "n": {"per_image": 1}}, 250) == {"n": {"per_image": 1}}
    assert domain.price_changes(book, {"m": {"per_image": 8}}, 250) == {"m": {"per_image": 8}}
    with pytest.raises(domain.InvalidArgument):
        domain.check_price("m", {"per_image": 1}, 99, 100, ["per_image"])
    with pytest.raises(domain.InvalidArgument):
        domain.check_price("m", {"per_second": 1}, 100, 100, ["per_image"])


def test_worst_case_text() -> None:
    limits = {"context_window": 32768, "max_output_tokens": 4096}
    call = domain.TextCall(model="m", text_bytes=100, segments=2, choices=None, max_tokens=None)
    assert domain.worst_text_units(call, limits) == domain.Units(input_tokens=100 + 16 + 8, output_tokens=4096)
    call = dataclasses.replace(call, choices=3, max_tokens=10)
    assert domain.worst_text_units(call, limits).output_tokens == 30
    # Values router_svc refuses are clamped to the most expensive admissible value.
    call = dataclasses.replace(call, choices=10_000, max_tokens=-5)
    assert domain.worst_text_units(call, limits).output_tokens == domain.CHOICES_MAX * 4096
    call = dataclasses.replace(call, choices=0, max_tokens=10**9)
    assert domain.worst_text_units(call, limits).output_tokens == 4096
    completions = domain.TextCall(model="m", text_bytes=10, segments=3, choices=2, max_tokens=5,
                                  per_segment_output=True)
    assert domain.worst_text_units(completions, limits) == domain.Units(input_tokens=10 + 24 + 8, output_tokens=30)


def test_a_settlement_never_charges_more_than_its_hold() -> None:
    """Output is cut first, then input; what is charged is what the usage row says, at the snapshot."""
    prices = {"input_per_million_tokens": 3_000_000_000, "output_per_million_tokens": 15_000_000_000}
    cut = domain.within_amount(prices, domain.Units(input_tokens=80, output_tokens=100_000), 246_000_000)
    assert cut == domain.Units(input_tokens=80, output_tokens=16_384)
    assert domain.within_amount(prices, domain.Units(1_000_000, 5), 1_500_000) == domain.Units(500, 0)
    assert domain.within_amount(prices, domain.Units(10, 10), 0) == domain.Units()
    fits = domain.Units(10, 10)
    assert domain.within_amount(prices, fits, 10**9) is fits
    # A unit priced at nothing is never cut: it costs nothing.
    free_output = {"input_per_million_tokens": 3_000_000_000}
    assert domain.within_amount(free_output, domain.Units(1000, 77), 1_500_000) == domain.Units(500, 77)
    images = {"per_image": 40_000_000}
    assert domain.within_amount(images, domain.Units(images=11), 40_000_000) == domain.Units(images=1)

    journal = MemoryJournal()
    journal.open_account("acct-a", 0)
    journal.hold(domain.HoldRequest("h", "acct-a", "k", "m", "r", prices, 1, 246_000_000), 0)
    result = journal.settle(domain.Settlement("h", domain.Units(80, 100_000), domain.COMPLETED, "r", 1), 1)
    assert (result.status, result.cost_nanos, result.capped) == (domain.SettleStatus.POSTED, 246_000_000, True)
    [row] = journal.usage
    assert row.units == domain.Units(80, 16_384) and row.cost_nanos == 246_000_000
    assert journal.transfers["post:h"].amount_nanos == 246_000_000
    assert journal.holds["h"].settlement.units == domain.Units(80, 100_000), "the hold keeps what was reported"
    again = journal.settle(domain.Settlement("h", domain.Units(80, 100_000), domain.COMPLETED, "r", 1), 2)
    assert again.status is domain.SettleStatus.DUPLICATE
    assert journal.accounts["acct-a"].balance_nanos == SIGNUP - 246_000_000
