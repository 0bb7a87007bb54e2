"""Reconciliation: the journal against usage rows, top-ups against Stripe, the Lago export against settled calls.

The rules live here and touch no database or network: the store streams rows
(ledger_svc.store.SqlStore, the `Source` below), Stripe's PaymentIntents come
through an `Intents` source (ledger_svc.stripe_client.Gateway), and Reconciler
judges them, yielding every drifting row it finds (the caller bounds how many it
sends) and one Summary per kind. What holds when nothing drifts:

journal  For every call since T (a hold created or settled since then): its hold
         transfer moves the hold's amount from its account; it was settled at most
         once (never both posted and voided) and its status agrees with its
         transfers; a posted call's debit (its post transfer) is units x the hold's
         price snapshot, rounded once per call as the ledger does
         (common.pricing.cost_nanos), and never more than the hold:
         debit == min(units x price, hold amount); its usage row says the same
         cost; a voided call has a failed usage row and costs nothing; every post,
         void and expire transfer and every usage row has its hold; no pending hold
         is past its expiry by more than the expiry sweep's slack. Over the whole
         journal, whatever T: each account's posted debits and credits are the sums
         of its transfers, its pending debits are its pending holds, and the
         balances sum to zero (debits == credits).
stripe   Every payment transfer since T ("stripe:<PaymentIntent id>") matches a
         PaymentIntent that Stripe says succeeded, for the same amount, credited to
         the account its customer and metadata name, with its top-up row marked
         succeeded; every succeeded PaymentIntent of ours (its customer is one of
         ours and its metadata names an account and a top-up) was credited, unless it
         is younger than the time billing takes to credit one whose event was lost.
         Credited at most once holds by construction: one transfer id per PaymentIntent.
lago     (only when the export is on) Every settled call since T was exported or is
         queued in the outbox, once, with the same amount and account, and nothing
         was exported that is not a settled call. The outbox keeps sent events for a
         week, so the check starts no earlier than that.
"""
import collections
import contextlib
import dataclasses
import datetime
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Protocol

from common import money, pricing
from ledger_svc import billing, domain

JOURNAL, STRIPE, LAGO = "journal", "stripe", "lago"
OK, DRIFT, OFF = "ok", "drift", "off"
DRIFTS_MAX_DEFAULT = 100
DRIFTS_MAX = 1000
# Bounds on what one run asks Stripe: beyond them the run says it is incomplete
# (narrow it with --since) rather than reading without end.
INTENTS_MAX = 100_000
PAYMENTS_MAX = 100_000
# Payment transfers whose PaymentIntent the listing did not show (created before T)
# are fetched one by one, at most this many.
LOOKUPS_MAX = 1000
STRIPE_PREFIX = billing.transfer_id("")
EXPORT_SENT, EXPORT_PENDING, EXPORT_FAILED = "sent", "pending", "failed"


# --- what the checks read -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class CallRow:
    """A hold with every journal row that should belong to it (None where there is none)."""

    hold: domain.Hold
    hold_transfer: domain.Transfer | None
    post: domain.Transfer | None
    void: domain.Transfer | None
    expire: domain.Transfer | None
    usage: domain.UsageRow | None


@dataclasses.dataclass(frozen=True, slots=True)
class AccountRow:
    """An account's columns beside what the journal says they should be."""

    account: domain.Account
    # Sums of the posted transfers (grants, payments, adjustments, posts) it is the debit / credit side of.
    journal_debits_nanos: int
    journal_credits_nanos: int
    # Sum of its holds still pending.
    held_nanos: int


@dataclasses.dataclass(frozen=True, slots=True)
class PaymentRow:
    """A payment transfer, with the top-up row billing keeps for its PaymentIntent (if any)."""

    transfer: domain.Transfer
    topup_id: str = ""
    topup_status: str = ""
    topup_amount_nanos: int = 0
    topup_account_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TopupRow:
    id: str
    account_id: str
    amount_nanos: int
    payment_intent_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Intent:
    """What Stripe says about one PaymentIntent."""

    id: str
    status: str
    amount_cents: int
    currency: str
    customer: str
    # Our ids, which billing puts in the metadata of every PaymentIntent it creates.
    account_id: str
    topup_id: str
    created_s: int


def intent_of(obj: Mapping) -> Intent:
    """A PaymentIntent as Stripe's API returns it (a plain dict)."""
    payment = billing.payment_of(billing.SUCCEEDED_EVENT, dict(obj))
    assert payment is not None
    return Intent(id=payment.payment_intent_id, status=str(obj.get("status") or ""),
                  amount_cents=payment.amount_cents, currency=payment.currency, customer=payment.customer_id,
                  account_id=payment.account_id, topup_id=payment.topup_id, created_s=int(obj.get("created") or 0))


@dataclasses.dataclass(frozen=True, slots=True)
class Export:
    """A row of the Lago outbox."""

    id: int
    transaction_id: str
    account_id: str
    cost_nanos: int
    status: str
    attempts: int = 0
    last_error: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class SettledCall:
    """A settled (not failed) call's usage row, the first outbox row for its transaction id,
    and how many there are."""

    usage: domain.UsageRow
    export: Export | None
    exports: int


def transaction_id(row: domain.UsageRow) -> str:
    """The Lago transaction id of a call (ledger_svc.store._lago_row writes the same)."""
    return row.request_id or row.hold_id


class Source(Protocol):
    """What the checks read from the ledger's database (ledger_svc.store.SqlStore). A scan
    hands its rows to `each` page by page (a synchronous function: no page is held across
    an await); the lists are at most `limit` long, with the total count beside them."""

    async def scan_calls(self, since_ms: int, each: Callable[[Sequence[CallRow]], None]) -> None: ...
    async def stray_transfers(self, since_ms: int, limit: int) -> tuple[list[domain.Transfer], int]: ...
    async def stray_usage(self, since_ms: int, limit: int) -> tuple[list[domain.UsageRow], int]: ...
    async def scan_accounts(self, each: Callable[[Sequence[AccountRow]], None]) -> None: ...
    async def payments(self, since_ms: int, limit: int) -> list[PaymentRow]: ...
    async def uncredited_topups(self, since_ms: int, limit: int) -> tuple[list[TopupRow], int]: ...
    async def accounts_of_customers(self, customer_ids: Iterable[str]) -> dict[str, str]: ...
    async def scan_settled_calls(self, since_ms: int, each: Callable[[Sequence[SettledCall]], None]) -> None: ...
    async def stray_exports(self, since_ms: int, limit: int) -> tuple[list[Export], int]: ...


class Intents(Protocol):
    """Stripe's PaymentIntents (ledger_svc.stripe_client.Gateway). Failures raise."""

    def intent_pages(self, created_gte_s: int) -> AsyncIterator[Sequence[Mapping]]: ...
    async def find_intent(self, intent_id: str) -> Mapping | None: ...


# --- what the checks say ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Drift:
    kind: str
    check: str
    row: str
    detail: str


@dataclasses.dataclass(frozen=True, slots=True)
class Figure:
    name: str
    count: int | None = None
    amount_nanos: int | None = None

    def text(self) -> str:
        parts = [self.name]
        if self.count is not None:
            parts.append(str(self.count))
        if self.amount_nanos is not None:
            parts.append(usd(self.amount_nanos))
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Summary:
    kind: str
    status: str
    figures: tuple[Figure, ...] = ()
    drifts: int = 0
    note: str = ""

    def line(self) -> str:
        """One line of the operator's report, e.g. "journal: ok; calls 3, posted 2 $0.0003, ..."."""
        text = f"{self.kind}: {self.status}"
        if self.figures:
            text += "; " + ", ".join(figure.text() for figure in self.figures)
        if self.drifts:
            text += f"; {self.drifts} drifting"
        if self.note:
            text += f" ({self.note})"
        return text


def usd(nanos: int) -> str:
    sign = "-" if nanos < 0 else ""
    return f"{sign}${money.usd(abs(nanos))}"


# --- journal: one call ----------------------------------------------------------------------

def expected_debit_nanos(hold: domain.Hold, units: domain.Units) -> int:
    """What a settled call costs: units x the hold's price snapshot, rounded once, at most the hold."""
    return min(pricing.cost_nanos(hold.prices, units.as_usage()), hold.amount_nanos)


def check_call(row: CallRow, now_ms: int, sweep_slack_ms: int) -> list[Drift]:
    """Every rule a call's rows break (see the module docstring)."""
    hold = row.hold
    ref = f"hold:{hold.id}"
    out = []

    def drift(check: str, detail: str) -> None:
        out.append(Drift(JOURNAL, check, ref, detail))

    _check_transfers(row, drift)
    settled = [name for name, t in (("post", row.post), ("void", row.void)) if t is not None]
    if len(settled) > 1:
        drift("settled_twice", f"posted {usd(row.post.amount_nanos)} and voided as well")
    _check_status(row, now_ms, sweep_slack_ms, drift)
    if row.usage is not None:
        _check_usage(row, drift)
    return out


def _check_transfers(row: CallRow, drift: Callable[[str, str], None]) -> None:
    hold = row.hold
    ht = row.hold_transfer
    if ht is None:
        drift("hold_transfer_missing", f"no transfer hold:{hold.id} for the hold of {usd(hold.amount_nanos)}")
    elif (ht.kind, ht.debit_account_id, ht.credit_account_id, ht.amount_nanos) != (
            domain.HOLD, hold.account_id, domain.SYS_REVENUE, hold.amount_nanos):
        drift("hold_transfer_mismatch", f"transfer {ht.kind} {ht.debit_account_id} -> {ht.credit_account_id} "
                                        f"{usd(ht.amount_nanos)}; the hold: {hold.account_id} {usd(hold.amount_nanos)}")
    for kind, transfer in ((domain.POST, row.post), (domain.VOID, row.void), (domain.EXPIRE, row.expire)):
        if transfer is None:
            continue
        if (transfer.kind, transfer.debit_account_id, transfer.credit_account_id, transfer.pending_id) != (
                kind, hold.account_id, domain.SYS_REVENUE, hold.transfer_id):
            drift("transfer_mismatch", f"transfer {transfer.id} is {transfer.kind} {transfer.debit_account_id} -> "
                                       f"{transfer.credit_account_id} pending {transfer.pending_id!r}; expected {kind} "
                                       f"{hold.account_id} -> {domain.SYS_REVENUE} pending {hold.transfer_id!r}")
        elif kind != domain.POST and transfer.amount_nanos != hold.amount_nanos:
            drift("transfer_mismatch", f"{kind} of {usd(transfer.amount_nanos)} for a hold of {usd(hold.amount_nanos)}")


def _check_status(row: CallRow, now_ms: int, sweep_slack_ms: int, drift: Callable[[str, str], None]) -> None:
    hold = row.hold
    status = hold.status
    if status == domain.PENDING:
        if row.post or row.void or row.expire or row.usage:
            drift("status_mismatch", "pending, yet it has a settlement or an expiry")
        elif hold.expires_ms + sweep_slack_ms < now_ms:
            drift("pending_past_expiry", f"expired {(now_ms - hold.expires_ms) // 1000} s ago and still holds "
                                         f"{usd(hold.amount_nanos)} (the sweep's slack is {sweep_slack_ms // 1000} s)")
    elif status == domain.POSTED:
        if row.post is None:
            drift("post_missing", "posted, but no post transfer")
        if row.usage is None:
            drift("usage_missing", "posted, but no usage row")
    elif status == domain.VOIDED:
        if row.post is not None and row.void is None:
            drift("status_mismatch", f"voided, yet posted {usd(row.post.amount_nanos)}")
        if row.void is None and row.expire is None:
            drift("void_missing", "voided, but neither a void nor an expire transfer released it")
        if row.usage is None:
            drift("usage_missing", "voided, but no usage row")
    elif status == domain.EXPIRED:
        if row.expire is None:
            drift("expire_missing", "expired, but no expire transfer")
        if row.post or row.void or row.usage:
            drift("status_mismatch", "expired, yet it has a settlement")
    else:
        drift("status_unknown", f"status {status!r}")


def _check_usage(row: CallRow, drift: Callable[[str, str], None]) -> None:
    hold, usage = row.hold, row.usage
    if usage.account_id != hold.account_id:
        drift("usage_account_mismatch", f"usage row of {usage.account_id}, hold of {hold.account_id}")
    if usage.outcome == domain.FAILED:
        if usage.cost_nanos:
            drift("usage_cost_mismatch", f"a failed call's usage row costs {usd(usage.cost_nanos)}")
        if row.post is not None:
            drift("status_mismatch", f"a failed call posted {usd(row.post.amount_nanos)}")
        return
    if usage.outcome not in domain.OUTCOMES:
        drift("usage_outcome_unknown", f"outcome {usage.outcome!r}")
        return
    if row.post is None:
        if hold.status != domain.POSTED:  # a posted hold without its post is reported once, above
            drift("post_missing", f"a {usage.outcome} usage row of {usd(usage.cost_nanos)} and no post transfer")
        return
    debit = row.post.amount_nanos
    exact = pricing.cost_nanos(hold.prices, usage.units.as_usage())
    expected = min(exact, hold.amount_nanos)
    if debit != expected:
        drift("debit_mismatch", f"debit {usd(debit)}; units x price {usd(exact)}, hold {usd(hold.amount_nanos)}: "
                                f"expected {usd(expected)} ({_units_text(usage.units)})")
    if usage.cost_nanos != debit:
        drift("usage_cost_mismatch", f"usage row says {usd(usage.cost_nanos)}, the debit is {usd(debit)}")
    if hold.status == domain.POSTED and hold.cost_nanos != debit:
        drift("hold_cost_mismatch", f"hold row says {usd(hold.cost_nanos)}, the debit is {usd(debit)}")


def _units_text(units: domain.Units) -> str:
    used = [f"{name} {count}" for name, count in units.as_usage().items() if count]
    return ", ".join(used) or "no units"


def stray_transfer(transfer: domain.Transfer) -> Drift:
    return Drift(JOURNAL, "transfer_without_hold", f"transfer:{transfer.id}",
                 f"{transfer.kind} of {usd(transfer.amount_nanos)} from {transfer.debit_account_id}: no such hold")


def stray_usage(row: domain.UsageRow) -> Drift:
    return Drift(JOURNAL, "usage_without_hold", f"usage:{row.hold_id}",
                 f"{row.outcome} call of {row.account_id} costing {usd(row.cost_nanos)}: no such hold")


# --- journal: the accounts ------------------------------------------------------------------

class AccountCheck:
    """Every account against its transfers and pending holds, fed in pages; finish() judges the
    system accounts (the revenue account's pending credits are every pending hold) and the sums."""

    def __init__(self) -> None:
        self.accounts = 0
        self.customers = 0
        self.customer_balances_nanos = 0
        self.balances_nanos = 0
        self.debits_pending_nanos = 0
        self.credits_pending_nanos = 0
        self.held_nanos = 0
        self._system: list[AccountRow] = []

    def feed(self, row: AccountRow) -> list[Drift]:
        a = row.account
        out = []
        self.accounts += 1
        self.balances_nanos += a.balance_nanos
        self.debits_pending_nanos += a.debits_pending
        self.credits_pending_nanos += a.credits_pending
        self.held_nanos += row.held_nanos
        if (a.debits_posted, a.credits_posted) != (row.journal_debits_nanos, row.journal_credits_nanos):
            out.append(Drift(JOURNAL, "balance_mismatch", f"account:{a.id}",
                             f"posted debits {usd(a.debits_posted)}, credits {usd(a.credits_posted)}; its transfers "
                             f"sum to debits {usd(row.journal_debits_nanos)}, credits "
                             f"{usd(row.journal_credits_nanos)}"))
        if a.kind == domain.CUSTOMER:
            self.customers += 1
            self.customer_balances_nanos += a.balance_nanos
            if (a.debits_pending, a.credits_pending) != (row.held_nanos, 0):
                out.append(_held_drift(a, row.held_nanos, 0))
        else:
            self._system.append(row)
        return out

    def finish(self) -> list[Drift]:
        out = []
        for row in self._system:
            expected_credits = self.held_nanos if row.account.id == domain.SYS_REVENUE else 0
            if (row.account.debits_pending, row.account.credits_pending) != (row.held_nanos, expected_credits):
                out.append(_held_drift(row.account, row.held_nanos, expected_credits))
        if self.balances_nanos:
            out.append(Drift(JOURNAL, "debits_differ_from_credits", "journal",
                             f"the balances of all accounts sum to {usd(self.balances_nanos)}, not 0"))
        if self.debits_pending_nanos != self.credits_pending_nanos:
            out.append(Drift(JOURNAL, "debits_differ_from_credits", "journal",
                             f"pending debits {usd(self.debits_pending_nanos)}, pending credits "
                             f"{usd(self.credits_pending_nanos)}"))
        return out

    def figures(self) -> tuple[Figure, ...]:
        return (Figure("accounts", self.accounts),
                Figure("customer balances", amount_nanos=self.customer_balances_nanos),
                Figure("sum of balances", amount_nanos=self.balances_nanos))


def _held_drift(account: domain.Account, debits: int, credits: int) -> Drift:
    return Drift(JOURNAL, "held_mismatch", f"account:{account.id}",
                 f"pending debits {usd(account.debits_pending)}, credits {usd(account.credits_pending)}; "
                 f"its pending holds say {usd(debits)}, {usd(credits)}")


# --- stripe ---------------------------------------------------------------------------------

def check_payment_row(row: PaymentRow) -> list[Drift]:
    """A payment transfer against its own shape and billing's top-up row."""
    t = row.transfer
    ref = f"transfer:{t.id}"
    if not t.id.startswith(STRIPE_PREFIX) or len(t.id) == len(STRIPE_PREFIX):
        return [Drift(STRIPE, "payment_without_intent", ref,
                      f"a payment of {usd(t.amount_nanos)} to {t.credit_account_id} names no PaymentIntent")]
    out = []
    if t.debit_account_id != domain.SYS_PAYMENTS:
        out.append(Drift(STRIPE, "payment_mismatch", ref, f"paid from {t.debit_account_id}, not {domain.SYS_PAYMENTS}"))
    if not row.topup_id:
        out.append(Drift(STRIPE, "topup_missing", ref,
                         f"{usd(t.amount_nanos)} credited to {t.credit_account_id}; billing has no top-up for it"))
    elif (row.topup_status, row.topup_amount_nanos, row.topup_account_id) != (
            billing.SUCCEEDED, t.amount_nanos, t.credit_account_id):
        out.append(Drift(STRIPE, "topup_mismatch", ref,
                         f"credited {usd(t.amount_nanos)} to {t.credit_account_id}; top-up {row.topup_id} is "
                         f"{row.topup_status} for {usd(row.topup_amount_nanos)} to {row.topup_account_id}"))
    return out


def check_intent(intent: Intent, payment: PaymentRow | None, customer_account: str | None, now_ms: int,
                 credit_slack_ms: int) -> tuple[str, list[Drift]]:
    """A PaymentIntent against its credit. Returns what it counts as (credited, awaiting,
    not_ours, not_succeeded) and the drifts."""
    ref = f"payment_intent:{intent.id}"
    if payment is None:
        ours = customer_account is not None and bool(intent.account_id) and intent.topup_id.startswith("topup_")
        if not ours:
            return "not_ours", []
        if intent.status != "succeeded":
            return "not_succeeded", []
        if now_ms - intent.created_s * 1000 <= credit_slack_ms:
            return "awaiting", []
        mismatch = "" if customer_account == intent.account_id else \
            f" (its customer is {customer_account}'s, its metadata names {intent.account_id})"
        return "uncredited", [Drift(STRIPE, "succeeded_not_credited", ref,
                                    f"{usd(intent.amount_cents * billing.NANOS_PER_CENT)} ({intent.currency}) "
                                    f"succeeded and was never credited{mismatch}")]
    t = payment.transfer
    out = []
    if intent.status != "succeeded":
        out.append(Drift(STRIPE, "credited_not_succeeded", ref,
                         f"credited {usd(t.amount_nanos)} to {t.credit_account_id}; Stripe says {intent.status}"))
    if intent.currency != billing.CURRENCY or intent.amount_cents * billing.NANOS_PER_CENT != t.amount_nanos:
        out.append(Drift(STRIPE, "amount_mismatch", ref,
                         f"credited {usd(t.amount_nanos)}; Stripe says {intent.amount_cents} cents {intent.currency}"))
    named = {name for name in (customer_account, intent.account_id) if name}
    if named != {t.credit_account_id}:
        out.append(Drift(STRIPE, "account_mismatch", ref,
                         f"credited to {t.credit_account_id}; its customer and metadata name "
                         f"{', '.join(sorted(named)) or 'no account'}"))
    return "credited", out


def intent_missing(payment: PaymentRow) -> Drift:
    t = payment.transfer
    return Drift(STRIPE, "credited_without_intent", f"transfer:{t.id}",
                 f"{usd(t.amount_nanos)} credited to {t.credit_account_id}; Stripe has no PaymentIntent "
                 f"{t.id.removeprefix(STRIPE_PREFIX)}")


def uncredited_topup(row: TopupRow) -> Drift:
    return Drift(STRIPE, "topup_without_credit", f"topup:{row.id}",
                 f"marked succeeded for {usd(row.amount_nanos)} to {row.account_id}; no transfer "
                 f"{billing.transfer_id(row.payment_intent_id)}")


# --- lago -----------------------------------------------------------------------------------

def check_export(call: SettledCall) -> tuple[str, list[Drift]]:
    """A settled call against its outbox rows: (sent, pending, failed or missing, drifts)."""
    usage, export = call.usage, call.export
    ref = f"lago:{transaction_id(usage)}"
    if export is None:
        return "missing", [Drift(LAGO, "not_exported", ref, f"settled for {usd(usage.cost_nanos)} ({usage.account_id}, "
                                                            f"hold {usage.hold_id}), never exported")]
    out = []
    if call.exports > 1:
        # One call exported twice, or two calls under one transaction id: Lago keeps one.
        out.append(Drift(LAGO, "duplicate_transaction_id", ref,
                         f"{call.exports} events carry this transaction id; Lago keeps one of them"))
    if export.cost_nanos != usage.cost_nanos:
        out.append(Drift(LAGO, "export_amount_mismatch", ref,
                         f"exported {usd(export.cost_nanos)}; the call was settled for {usd(usage.cost_nanos)}"))
    if export.account_id != usage.account_id:
        out.append(Drift(LAGO, "export_account_mismatch", ref,
                         f"exported for {export.account_id}; the call is {usage.account_id}'s"))
    if export.status == EXPORT_FAILED:
        out.append(Drift(LAGO, "export_failed", ref,
                         f"given up after {export.attempts} attempts: {export.last_error[:200]}"))
    elif export.status not in (EXPORT_SENT, EXPORT_PENDING):
        out.append(Drift(LAGO, "export_status_unknown", ref, f"status {export.status!r}"))
    return export.status, out


def stray_export(export: Export) -> Drift:
    return Drift(LAGO, "exported_not_settled", f"lago:{export.transaction_id}",
                 f"an event of {usd(export.cost_nanos)} for {export.account_id} ({export.status}); no settled call "
                 "has this transaction id")


# --- the run ------------------------------------------------------------------------------

def utc_text(unix_ms: int) -> str:
    return datetime.datetime.fromtimestamp(unix_ms / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Policy:
    # A pending hold may outlive its expiry by this much before it counts as a drift:
    # the expiry sweep's interval plus a batch.
    sweep_slack_ms: int
    # A succeeded PaymentIntent may stay uncredited this long: its event is lost, and
    # billing's own reconciler finds it (stripe_service.RECONCILE_AFTER_MS and its period).
    credit_slack_ms: int
    # Whether settled calls are exported to Lago, and how long the outbox keeps sent events.
    lago_on: bool = False
    lago_window_ms: int = 0


class _Drifts:
    """Every drift counted by kind; the first `keep` of them kept to be listed."""

    def __init__(self, keep: int) -> None:
        self.counts: collections.Counter = collections.Counter()
        self._keep = keep
        self._kept: list[Drift] = []
        self._taken = 0

    def add(self, drifts: Iterable[Drift]) -> None:
        for drift in drifts:
            self.counts[drift.kind] += 1
            if self._taken + len(self._kept) < self._keep:
                self._kept.append(drift)

    def add_listed(self, kind: str, drifts: list[Drift], total: int) -> None:
        """Drifts of which the store sent only the first few (and counted all)."""
        self.add(drifts)
        self.counts[kind] += total - len(drifts)

    def take(self) -> list[Drift]:
        taken, self._kept = self._kept, []
        self._taken += len(taken)
        return taken

    def summary(self, kind: str, figures: tuple[Figure, ...], note: str) -> "Summary":
        return Summary(kind, DRIFT if self.counts[kind] else OK, figures, self.counts[kind], note)


class Reconciler:
    """One run over the journal, Stripe (when `intents` is given) and Lago (when on)."""

    def __init__(self, source: Source, intents: Intents | None, clock: domain.Clock, policy: Policy) -> None:
        self._source = source
        self._intents = intents
        self._clock = clock
        self._policy = policy

    async def run(self, since_ms: int, drifts_max: int = DRIFTS_MAX_DEFAULT) -> AsyncIterator[Drift | Summary]:
        """The drifts each kind found (at most `drifts_max` in all), then its Summary; journal,
        then stripe, then lago."""
        drifts = _Drifts(drifts_max)
        for check in (self._journal, self._stripe, self._lago):
            summary = await check(max(since_ms, 0), drifts)
            for drift in drifts.take():
                yield drift
            yield summary

    async def _journal(self, since_ms: int, drifts: _Drifts) -> Summary:
        now = self._clock()
        counts: collections.Counter = collections.Counter()
        amounts: collections.Counter = collections.Counter()

        def calls(page: Sequence[CallRow]) -> None:
            for row in page:
                counts["calls"] += 1
                counts[row.hold.status] += 1
                if row.post is not None:
                    amounts[domain.POSTED] += row.post.amount_nanos
                if row.hold.status == domain.PENDING:
                    amounts[domain.PENDING] += row.hold.amount_nanos
                drifts.add(check_call(row, now, self._policy.sweep_slack_ms))

        await self._source.scan_calls(since_ms, calls)
        for fetch, judge in ((self._source.stray_transfers, stray_transfer), (self._source.stray_usage, stray_usage)):
            rows, total = await fetch(since_ms, DRIFTS_MAX)
            drifts.add_listed(JOURNAL, [judge(row) for row in rows], total)
        books = AccountCheck()

        def accounts(page: Sequence[AccountRow]) -> None:
            for row in page:
                drifts.add(books.feed(row))

        await self._source.scan_accounts(accounts)
        drifts.add(books.finish())
        figures = (Figure("calls", counts["calls"]), Figure("posted", counts[domain.POSTED], amounts[domain.POSTED]),
                   Figure("voided", counts[domain.VOIDED]), Figure("expired", counts[domain.EXPIRED]),
                   Figure("pending", counts[domain.PENDING], amounts[domain.PENDING])) + books.figures()
        return drifts.summary(JOURNAL, figures, _since_note(since_ms))

    async def _stripe(self, since_ms: int, drifts: _Drifts) -> Summary:
        if self._intents is None:
            return Summary(STRIPE, OFF, note="no Stripe key configured")
        payments = await self._source.payments(since_ms, PAYMENTS_MAX + 1)
        if len(payments) > PAYMENTS_MAX:
            drifts.add([Drift(STRIPE, "incomplete", "stripe", f"more than {PAYMENTS_MAX} payments: narrow it "
                                                               "with --since")])
            return drifts.summary(STRIPE, (), _since_note(since_ms))
        by_intent: dict[str, PaymentRow] = {}
        for payment in payments:
            found = check_payment_row(payment)
            drifts.add(found)
            if payment.transfer.id.startswith(STRIPE_PREFIX) and not any(
                    d.check == "payment_without_intent" for d in found):
                by_intent[payment.transfer.id.removeprefix(STRIPE_PREFIX)] = payment
        counts: collections.Counter = collections.Counter()
        credited_nanos = 0
        now = self._clock()
        try:
            async for intent, payment, customer_account in self._listed(since_ms, by_intent, counts):
                if intent is None:
                    drifts.add([intent_missing(payment)])
                    continue
                verdict, found = check_intent(intent, payment, customer_account, now, self._policy.credit_slack_ms)
                counts[verdict] += 1
                if verdict == "credited":
                    credited_nanos += payment.transfer.amount_nanos
                drifts.add(found)
        except Exception as error:  # noqa: BLE001 - whatever stopped the listing, the check is incomplete
            drifts.add([Drift(STRIPE, "incomplete", "stripe", f"Stripe could not be read to the end: {error}")])
        rows, total = await self._source.uncredited_topups(since_ms, DRIFTS_MAX)
        drifts.add_listed(STRIPE, [uncredited_topup(row) for row in rows], total)
        figures = (Figure("credited", counts["credited"], credited_nanos), Figure("payment intents", counts["seen"]),
                   Figure("awaiting credit", counts["awaiting"]), Figure("not ours", counts["not_ours"]))
        return drifts.summary(STRIPE, figures, _since_note(since_ms))

    async def _listed(self, since_ms: int, by_intent: dict[str, PaymentRow], counts: collections.Counter):
        """Each PaymentIntent since T with its payment and its customer's account; then the
        payments whose PaymentIntent the listing did not show, fetched one by one (None: Stripe
        has no such PaymentIntent)."""
        async with contextlib.aclosing(self._intents.intent_pages(since_ms // 1000)) as pages:
            async for page in pages:
                intents = [intent_of(obj) for obj in page]
                customers = await self._source.accounts_of_customers({i.customer for i in intents if i.customer})
                for intent in intents:
                    counts["seen"] += 1
                    if counts["seen"] > INTENTS_MAX:
                        raise RuntimeError(f"more than {INTENTS_MAX} PaymentIntents: narrow it with --since")
                    yield intent, by_intent.pop(intent.id, None), customers.get(intent.customer)
        unlisted = sorted(by_intent.items())
        if len(unlisted) > LOOKUPS_MAX:
            raise RuntimeError(f"{len(unlisted)} payments whose PaymentIntent was not listed, more than {LOOKUPS_MAX}")
        for intent_id, payment in unlisted:
            found = await self._intents.find_intent(intent_id)
            if found is None:
                yield None, payment, None
                continue
            intent = intent_of(found)
            customers = await self._source.accounts_of_customers([intent.customer] if intent.customer else [])
            counts["seen"] += 1
            yield intent, payment, customers.get(intent.customer)

    async def _lago(self, since_ms: int, drifts: _Drifts) -> Summary:
        if not self._policy.lago_on:
            return Summary(LAGO, OFF)
        start = max(since_ms, self._clock() - self._policy.lago_window_ms)
        counts: collections.Counter = collections.Counter()
        settled_nanos = 0

        def calls(page: Sequence[SettledCall]) -> None:
            nonlocal settled_nanos
            for call in page:
                state, found = check_export(call)
                counts["settled"] += 1
                counts[state] += 1
                settled_nanos += call.usage.cost_nanos
                drifts.add(found)

        await self._source.scan_settled_calls(start, calls)
        rows, total = await self._source.stray_exports(start, DRIFTS_MAX)
        drifts.add_listed(LAGO, [stray_export(row) for row in rows], total)
        figures = (Figure("settled calls", counts["settled"], settled_nanos), Figure("exported", counts[EXPORT_SENT]),
                   Figure("queued", counts[EXPORT_PENDING]))
        note = _since_note(start) + (", the outbox keeps a week" if start > since_ms else "")
        return drifts.summary(LAGO, figures, note)


def _since_note(since_ms: int) -> str:
    return f"since {utc_text(since_ms)}" if since_ms > 0 else ""
