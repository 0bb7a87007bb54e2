"""The ledger's rules: accounts, transfers, two-phase holds, settlement, notices and worst cases.

Pure Python: no grpc, SQL or network here. Money is integer nano-dollars
(1e-9 USD); decimal USD strings exist only at the edges (common.money).

The journal follows TigerBeetle's model. Every movement is a transfer from a
debit account to a credit account, so the sum of all balances is zero at all
times. Customer accounts are credit-normal: balance = credits_posted -
debits_posted, and a pending hold adds to debits_pending, so available =
balance - held. System accounts (grants, revenue, payments, adjustments) are
the other side of every customer movement. Transfer ids are chosen by the
caller (or derived from one, e.g. "post:<hold id>"): the same id again with the
same fields is a no-op ("exists"), with other fields a rejection. Rejections are
one ordered enum, checked in a flat ladder; the first that applies wins.

Holds are two-phase transfers: a Check creates a pending transfer of the
call's worst-case cost; the settlement posts the real cost, never more than the
hold (Book.settle), and releases the rest, or voids it; a hold nobody settles
expires and stops reducing the available balance, and a late settlement still
posts its charge. A hold starts with a short lifetime (Policy.unclaimed_ttl_ms)
and gets the full one (hold_ttl_ms from the claim) when router_svc claims it, that
is, starts to run the call, and again each time router_svc renews the claim of a
call still running: a hold whose call never reached a router (its client left on
the way) stops holding credit soon after, and a long call keeps its hold.

Rounding rule (common.pricing.cost_nanos): a call's cost is computed exactly as
a fraction of a nano-dollar per unit, the fractions are summed, and the total is
rounded half up to a whole nano-dollar, once per call. The charge uses the price
version in effect when the hold was taken (its snapshot), never a later one.
"""
import dataclasses
import datetime
import enum
from collections.abc import Callable, Iterable, Mapping

from common import pricing

CUSTOMER = "customer"
SYSTEM = "system"
SYS_ADJUSTMENTS = "sys:adjustments"
SYS_GRANTS = "sys:grants"
SYS_PAYMENTS = "sys:payments"
SYS_REVENUE = "sys:revenue"
SYSTEM_ACCOUNTS = (SYS_ADJUSTMENTS, SYS_GRANTS, SYS_PAYMENTS, SYS_REVENUE)

# Transfer kinds. Callers choose ids only for payments and adjustments; the rest
# derive theirs from something unique (the account, the hold).
GRANT, PAYMENT, ADJUSTMENT = "grant", "payment", "adjustment"
HOLD, POST, VOID, EXPIRE = "hold", "post", "void", "expire"
CREDIT_KINDS = (PAYMENT, ADJUSTMENT)
# Prefixes of the ids the ledger derives itself; a caller may not pick them.
RESERVED_PREFIXES = ("sys:", "grant:", "hold:", "post:", "void:", "expire:")

# Hold states.
PENDING, POSTED, VOIDED, EXPIRED = "pending", "posted", "voided", "expired"
# Settlement outcomes.
COMPLETED, ABORTED, FAILED = "completed", "aborted", "failed"
OUTCOMES = (COMPLETED, ABORTED, FAILED)

ID_LENGTH_MAX = 200
HOLD_ID_LENGTH_MAX = 64
REQUEST_ID_LENGTH_MAX = 200
ACCOUNT_ID_LENGTH_MAX = 128
REASON_LENGTH_MAX = 500
EMAIL_LENGTH_MAX = 320
SETTLEMENTS_MAX = 1000
# OpenAI caps n at 128; larger values are refused by router_svc, so holding
# for 128 choices is already more than any admitted call can produce.
CHOICES_MAX = 128
# A text model whose catalog entry names no output cap is held for this many.
OUTPUT_TOKENS_FALLBACK = 131_072
# Every chat message (or completion prompt), and the call itself, may add this
# many tokens of framing beyond the bytes of its text.
TOKENS_PER_MESSAGE = 8
TOKENS_PER_CALL = 8


# When a settlement's units cost more than its hold, they are cut in this order: the output
# a backend generated beyond what was held goes first, what the caller sent next.
CUT_ORDER = ("output_tokens", "input_tokens", "images", "video_ms", "characters", "audio_ms")


class LedgerError(Exception):
    """A request the ledger refuses. `code` names the rejection; `grpc_code` is the
    name of the google.rpc code that fits (server.py maps it)."""

    grpc_code = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class InvalidArgument(LedgerError):
    grpc_code = "INVALID_ARGUMENT"


class NotFound(LedgerError):
    grpc_code = "NOT_FOUND"


class AlreadyExists(LedgerError):
    grpc_code = "ALREADY_EXISTS"


# --- accounts and transfers -------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class Account:
    id: str
    kind: str = CUSTOMER
    email: str = ""
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    # Set when the low-balance (or $0) notice went out; cleared when the balance
    # is lifted back over the line, which arms the notice again.
    low_notified: bool = False
    zero_notified: bool = False

    @property
    def balance_nanos(self) -> int:
        return self.credits_posted - self.debits_posted

    @property
    def held_nanos(self) -> int:
        return self.debits_pending

    @property
    def available_nanos(self) -> int:
        return self.balance_nanos - self.held_nanos


@dataclasses.dataclass(frozen=True, slots=True)
class Transfer:
    id: str
    kind: str
    debit_account_id: str
    credit_account_id: str
    amount_nanos: int
    pending_id: str = ""
    reason: str = ""
    created_ms: int = 0


class TransferResult(enum.Enum):
    """What happened to a transfer, in ladder order (TigerBeetle's create_transfers style)."""

    CREATED = "created"
    ID_MUST_NOT_BE_EMPTY = "id_must_not_be_empty"
    ID_TOO_LONG = "id_too_long"
    ID_RESERVED = "id_reserved"
    KIND_INVALID = "kind_invalid"
    AMOUNT_MUST_NOT_BE_ZERO = "amount_must_not_be_zero"
    PAYMENT_MUST_BE_POSITIVE = "payment_must_be_positive"
    REASON_TOO_LONG = "reason_too_long"
    EXISTS_WITH_DIFFERENT_KIND = "exists_with_different_kind"
    EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID = "exists_with_different_debit_account_id"
    EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID = "exists_with_different_credit_account_id"
    EXISTS_WITH_DIFFERENT_AMOUNT = "exists_with_different_amount"
    EXISTS_WITH_DIFFERENT_PENDING_ID = "exists_with_different_pending_id"
    EXISTS_WITH_DIFFERENT_REASON = "exists_with_different_reason"
    EXISTS = "exists"
    DEBIT_ACCOUNT_NOT_FOUND = "debit_account_not_found"
    CREDIT_ACCOUNT_NOT_FOUND = "credit_account_not_found"

    @property
    def ok(self) -> bool:
        return self in (TransferResult.CREATED, TransferResult.EXISTS)


def credit_transfer(account_id: str, amount_nanos: int, transfer_id: str, reason: str, kind: str,
                    now_ms: int) -> Transfer:
    """A payment or an operator's adjustment as a journal transfer (amounts stored positive:
    a negative adjustment is a transfer the other way)."""
    system = SYS_PAYMENTS if kind == PAYMENT else SYS_ADJUSTMENTS
    if amount_nanos >= 0:
        debit, credit = system, account_id
    else:
        debit, credit = account_id, system
    return Transfer(id=transfer_id, kind=kind, debit_account_id=debit, credit_account_id=credit,
                    amount_nanos=abs(amount_nanos), reason=reason, created_ms=now_ms)


def check_credit(transfer_id: str, kind: str, amount_nanos: int, reason: str) -> TransferResult | None:
    """The request-only rungs of the ladder for a caller-chosen transfer; None: passes them."""
    if not transfer_id:
        return TransferResult.ID_MUST_NOT_BE_EMPTY
    if len(transfer_id) > ID_LENGTH_MAX:
        return TransferResult.ID_TOO_LONG
    if transfer_id.startswith(RESERVED_PREFIXES):
        return TransferResult.ID_RESERVED
    if kind not in CREDIT_KINDS:
        return TransferResult.KIND_INVALID
    if amount_nanos == 0:
        return TransferResult.AMOUNT_MUST_NOT_BE_ZERO
    if kind == PAYMENT and amount_nanos < 0:
        return TransferResult.PAYMENT_MUST_BE_POSITIVE
    if len(reason) > REASON_LENGTH_MAX:
        return TransferResult.REASON_TOO_LONG
    return None


def compare_existing(new: Transfer, existing: Transfer | None) -> TransferResult | None:
    """The exists rungs: None when no transfer has this id yet."""
    if existing is None:
        return None
    if existing.kind != new.kind:
        return TransferResult.EXISTS_WITH_DIFFERENT_KIND
    if existing.debit_account_id != new.debit_account_id:
        return TransferResult.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
    if existing.credit_account_id != new.credit_account_id:
        return TransferResult.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
    if existing.amount_nanos != new.amount_nanos:
        return TransferResult.EXISTS_WITH_DIFFERENT_AMOUNT
    if existing.pending_id != new.pending_id:
        return TransferResult.EXISTS_WITH_DIFFERENT_PENDING_ID
    if existing.reason != new.reason:
        return TransferResult.EXISTS_WITH_DIFFERENT_REASON
    return TransferResult.EXISTS


def signup_grant(account_id: str, amount_nanos: int, now_ms: int) -> Transfer:
    return Transfer(id=f"grant:signup:{account_id}", kind=GRANT, debit_account_id=SYS_GRANTS,
                    credit_account_id=account_id, amount_nanos=amount_nanos,
                    reason="signup credit", created_ms=now_ms)


def check_account_id(account_id: str) -> None:
    if not account_id or len(account_id) > ACCOUNT_ID_LENGTH_MAX or account_id.startswith(RESERVED_PREFIXES):
        raise InvalidArgument("account_id must be 1 to 128 characters and not a reserved name",
                              code="invalid_account_id", param="account_id")


# --- holds and settlements --------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Units:
    input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0
    video_ms: int = 0
    characters: int = 0
    audio_ms: int = 0

    def as_usage(self) -> dict[str, int]:
        # By hand: dataclasses.asdict deep-copies, and this runs for every settled call.
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "images": self.images,
                "video_ms": self.video_ms, "characters": self.characters, "audio_ms": self.audio_ms}

    def negative(self) -> bool:
        return min(self.input_tokens, self.output_tokens, self.images, self.video_ms, self.characters,
                   self.audio_ms) < 0


UNIT_FIELDS = tuple(field.name for field in dataclasses.fields(Units))
assert set(UNIT_FIELDS) == set(pricing.USAGE_FIELDS)


@dataclasses.dataclass(frozen=True, slots=True)
class Settlement:
    hold_id: str
    units: Units
    outcome: str
    request_id: str = ""
    ended_ms: int = 0


@dataclasses.dataclass(slots=True)
class Hold:
    id: str
    account_id: str
    key_id: str
    model: str
    request_id: str
    # The price snapshot in effect when the hold was taken: the charge uses it.
    prices: Mapping[str, int]
    price_version: int
    amount_nanos: int
    created_ms: int
    expires_ms: int
    status: str = PENDING
    settlement: Settlement | None = None
    cost_nanos: int = 0
    settled_ms: int = 0
    # encode_header(prices), when known: the row stores prices in that form.
    prices_header: str = ""

    @property
    def transfer_id(self) -> str:
        return "hold:" + self.id


@dataclasses.dataclass(frozen=True, slots=True)
class HoldRequest:
    # Chosen by the caller (the Check draws a uuid4): the same id again is a replay.
    hold_id: str
    account_id: str
    key_id: str
    model: str
    request_id: str
    prices: Mapping[str, int]
    price_version: int
    amount_nanos: int
    # common.pricing.encode_header(prices) when the caller has it already (PriceVersion.header).
    prices_header: str = ""


class HoldResult(enum.Enum):
    """Ladder order, as TigerBeetle checks a pending transfer: the balance comes last."""

    ADMITTED = "admitted"
    HOLD_ID_MUST_NOT_BE_EMPTY = "hold_id_must_not_be_empty"
    HOLD_ID_TOO_LONG = "hold_id_too_long"
    EXISTS_WITH_DIFFERENT_FIELDS = "exists_with_different_fields"
    EXISTS = "exists"
    ACCOUNT_NOT_FOUND = "account_not_found"
    INSUFFICIENT_CREDIT = "insufficient_credit"

    @property
    def admitted(self) -> bool:
        return self in (HoldResult.ADMITTED, HoldResult.EXISTS)


@dataclasses.dataclass(frozen=True, slots=True)
class HoldDecision:
    result: HoldResult
    hold_id: str = ""
    available_nanos: int = 0


class SettleStatus(enum.Enum):
    """Ladder order: the request's own faults, then lookups, then replays, then effects."""

    HOLD_ID_MUST_NOT_BE_EMPTY = "hold_id_must_not_be_empty"
    OUTCOME_INVALID = "outcome_invalid"
    REQUEST_ID_TOO_LONG = "request_id_too_long"
    UNITS_MUST_NOT_BE_NEGATIVE = "units_must_not_be_negative"
    UNKNOWN_HOLD = "unknown_hold"
    CONFLICT = "conflict"
    DUPLICATE = "duplicate"
    POSTED = "posted"
    VOIDED = "voided"


@dataclasses.dataclass(frozen=True, slots=True)
class SettleResult:
    hold_id: str
    status: SettleStatus
    cost_nanos: int = 0
    # The reported units cost more than the hold: the charge was cut to fit it.
    capped: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class UsageRow:
    account_id: str
    hold_id: str
    request_id: str
    key_id: str
    model: str
    created_ms: int
    units: Units
    cost_nanos: int
    outcome: str

    @property
    def day(self) -> str:
        return utc_day(self.created_ms)


def utc_day(unix_ms: int) -> str:
    return datetime.datetime.fromtimestamp(unix_ms / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%d")


LOW, ZERO = "low", "zero"


@dataclasses.dataclass(frozen=True)
class Notice:
    account_id: str
    email: str
    kind: str  # LOW (below the low-balance line) or ZERO (at or below $0)
    balance_nanos: int
    created_ms: int


@dataclasses.dataclass(frozen=True)
class Policy:
    low_balance_nanos: int
    # The lifetime of a claimed hold, from its creation.
    hold_ttl_ms: int
    # The lifetime of a hold no router has claimed yet; 0: hold_ttl_ms.
    unclaimed_ttl_ms: int = 0

    def first_expiry_ms(self, now_ms: int) -> int:
        ttl = self.hold_ttl_ms if not self.unclaimed_ttl_ms else min(self.unclaimed_ttl_ms, self.hold_ttl_ms)
        return now_ms + ttl

    def claimed_expiry_ms(self, claimed_ms: int) -> int:
        return claimed_ms + self.hold_ttl_ms


def crossing(account: Account, before_nanos: int, low_nanos: int) -> str | None:
    """Updates the account's notice flags after its balance moved from `before_nanos`;
    returns the notice to send, if any. A drop straight through both lines sends only
    the $0 notice (and counts the low one as sent): one email, the one that matters."""
    after = account.balance_nanos
    if after > before_nanos:
        if after >= low_nanos:
            account.low_notified = False
        if after > 0:
            account.zero_notified = False
        return None
    if after == before_nanos:
        return None
    if after <= 0 and not account.zero_notified:
        account.zero_notified = True
        account.low_notified = True
        return ZERO
    if after < low_nanos and not account.low_notified:
        account.low_notified = True
        return LOW
    return None


class Book:
    """The accounts and holds one unit of work touches, and what it changed.

    The SQL store loads (and locks) the rows a batch needs, lets a Book decide
    every operation in arrival order, then writes the Book's changes; an
    in-memory store can keep one Book's dictionaries for good. System accounts
    need not be loaded: their movements are recorded as deltas.
    """

    def __init__(self, accounts: dict[str, Account], holds: dict[str, Hold], policy: Policy) -> None:
        self.accounts = accounts
        self.holds = holds
        self.policy = policy
        # account id -> [debits_pending, debits_posted, credits_pending, credits_posted] deltas
        self.deltas: dict[str, list[int]] = {}
        self.transfers: list[Transfer] = []
        self.new_holds: list[Hold] = []
        self.changed_holds: dict[str, Hold] = {}
        self.usage: list[UsageRow] = []
        self.notices: list[Notice] = []

    def _account(self, account_id: str) -> Account:
        account = self.accounts.get(account_id)
        if account is None:
            assert account_id in SYSTEM_ACCOUNTS, account_id
            account = self.accounts[account_id] = Account(account_id, kind=SYSTEM)
        return account

    def _move(self, debit_id: str, credit_id: str, amount: int, *, pending: bool) -> None:
        debit, credit = self._account(debit_id), self._account(credit_id)
        d = self.deltas.setdefault(debit_id, [0, 0, 0, 0])
        c = self.deltas.setdefault(credit_id, [0, 0, 0, 0])
        if pending:
            debit.debits_pending += amount
            credit.credits_pending += amount
            d[0] += amount
            c[2] += amount
        else:
            debit.debits_posted += amount
            credit.credits_posted += amount
            d[1] += amount
            c[3] += amount

    def assert_balanced(self) -> None:
        """Our invariant, checked before anything is written: every movement had two sides."""
        pending_debits = sum(d[0] for d in self.deltas.values())
        posted_debits = sum(d[1] for d in self.deltas.values())
        assert pending_debits == sum(d[2] for d in self.deltas.values()), "pending debits != pending credits"
        assert posted_debits == sum(d[3] for d in self.deltas.values()), "debits != credits"

    def _notice(self, account: Account, before_nanos: int, now_ms: int) -> None:
        kind = crossing(account, before_nanos, self.policy.low_balance_nanos)
        if kind is not None and account.email:
            self.notices.append(Notice(account.id, account.email, kind, account.balance_nanos, now_ms))

    def post_transfer(self, transfer: Transfer, existing: Transfer | None) -> TransferResult:
        """Posts a single-phase transfer (grant, payment, adjustment) after the ladder's
        exists and account rungs; the request rungs are the caller's (check_credit)."""
        replay = compare_existing(transfer, existing)
        if replay is not None:
            return replay
        if transfer.debit_account_id not in self.accounts and transfer.debit_account_id not in SYSTEM_ACCOUNTS:
            return TransferResult.DEBIT_ACCOUNT_NOT_FOUND
        if transfer.credit_account_id not in self.accounts and transfer.credit_account_id not in SYSTEM_ACCOUNTS:
            return TransferResult.CREDIT_ACCOUNT_NOT_FOUND
        customers = [a for a in (self.accounts.get(transfer.debit_account_id),
                                 self.accounts.get(transfer.credit_account_id)) if a and a.kind == CUSTOMER]
        before = [a.balance_nanos for a in customers]
        self._move(transfer.debit_account_id, transfer.credit_account_id, transfer.amount_nanos, pending=False)
        self.transfers.append(transfer)
        for account, balance in zip(customers, before):
            self._notice(account, balance, transfer.created_ms)
        return TransferResult.CREATED

    def hold(self, request: HoldRequest, now_ms: int) -> HoldDecision:
        """Admits the call while the account's available balance is > 0, holding its worst case."""
        assert request.amount_nanos >= 0, request
        hold_id = request.hold_id
        if not hold_id:
            return HoldDecision(HoldResult.HOLD_ID_MUST_NOT_BE_EMPTY)
        if len(hold_id) > HOLD_ID_LENGTH_MAX:
            return HoldDecision(HoldResult.HOLD_ID_TOO_LONG)
        existing = self.holds.get(hold_id)
        if existing is not None:
            same = (existing.account_id, existing.key_id, existing.model, existing.request_id, dict(existing.prices),
                    existing.price_version, existing.amount_nanos) == (
                request.account_id, request.key_id, request.model, request.request_id, dict(request.prices),
                request.price_version, request.amount_nanos)
            return HoldDecision(HoldResult.EXISTS if same else HoldResult.EXISTS_WITH_DIFFERENT_FIELDS, hold_id)
        account = self.accounts.get(request.account_id)
        if account is None or account.kind != CUSTOMER:
            return HoldDecision(HoldResult.ACCOUNT_NOT_FOUND)
        available = account.available_nanos
        if available <= 0:
            return HoldDecision(HoldResult.INSUFFICIENT_CREDIT, available_nanos=available)
        hold = Hold(id=hold_id, account_id=account.id, key_id=request.key_id, model=request.model,
                    request_id=request.request_id, prices=request.prices, price_version=request.price_version,
                    amount_nanos=request.amount_nanos, created_ms=now_ms,
                    expires_ms=self.policy.first_expiry_ms(now_ms), prices_header=request.prices_header)
        self._move(account.id, SYS_REVENUE, hold.amount_nanos, pending=True)
        self.transfers.append(Transfer(id=hold.transfer_id, kind=HOLD, debit_account_id=account.id,
                                       credit_account_id=SYS_REVENUE, amount_nanos=hold.amount_nanos,
                                       created_ms=now_ms))
        self.holds[hold_id] = hold
        self.new_holds.append(hold)
        return HoldDecision(HoldResult.ADMITTED, hold_id=hold_id, available_nanos=available)

    def settle(self, settlement: Settlement, now_ms: int) -> SettleResult:
        """Posts a call's charge (or voids its hold) once; the same settlement again is a duplicate.

        The rule reconciliation checks: the charge never exceeds the hold. A completed or
        aborted call is charged cost_nanos(hold.prices, charged), where `charged` are the
        reported units, or, when those would cost more than hold.amount_nanos, the units
        cut to fit it (within_amount: output tokens first, then input tokens, then the
        media units). The usage row records `charged`, so for every usage row:

            cost_nanos(the hold's price snapshot, the row's units) == row.cost_nanos
                == the amount of its "post:<hold id>" transfer  <= the hold's amount_nanos

        (a failed call: cost 0, a "void:<hold id>" transfer of the hold's amount, and the
        row's units as reported). The hold row keeps the units as reported, so that the
        same settlement sent again is recognised as a duplicate; it is the usage row
        whose units price to the debit.
        """
        s = settlement
        if not s.hold_id:
            return SettleResult(s.hold_id, SettleStatus.HOLD_ID_MUST_NOT_BE_EMPTY)
        if s.outcome not in OUTCOMES:
            return SettleResult(s.hold_id, SettleStatus.OUTCOME_INVALID)
        if len(s.request_id) > REQUEST_ID_LENGTH_MAX:
            return SettleResult(s.hold_id, SettleStatus.REQUEST_ID_TOO_LONG)
        if s.units.negative():
            return SettleResult(s.hold_id, SettleStatus.UNITS_MUST_NOT_BE_NEGATIVE)
        hold = self.holds.get(s.hold_id)
        if hold is None:
            return SettleResult(s.hold_id, SettleStatus.UNKNOWN_HOLD)
        if hold.settlement is not None:
            status = SettleStatus.DUPLICATE if hold.settlement == s else SettleStatus.CONFLICT
            return SettleResult(s.hold_id, status, hold.cost_nanos)
        account = self.accounts[hold.account_id]
        if hold.status == PENDING:
            self._move(account.id, SYS_REVENUE, -hold.amount_nanos, pending=True)
        charged = s.units
        if s.outcome == FAILED:
            cost = 0
            if hold.status == PENDING:
                self.transfers.append(Transfer(id="void:" + hold.id, kind=VOID, debit_account_id=account.id,
                                               credit_account_id=SYS_REVENUE, amount_nanos=hold.amount_nanos,
                                               pending_id=hold.transfer_id, created_ms=now_ms))
            hold.status = VOIDED
        else:
            cost = pricing.cost_nanos(hold.prices, charged.as_usage())
            if cost > hold.amount_nanos:
                charged = within_amount(hold.prices, charged, hold.amount_nanos)
                cost = pricing.cost_nanos(hold.prices, charged.as_usage())
            before = account.balance_nanos
            self._move(account.id, SYS_REVENUE, cost, pending=False)
            self.transfers.append(Transfer(id="post:" + hold.id, kind=POST, debit_account_id=account.id,
                                           credit_account_id=SYS_REVENUE, amount_nanos=cost,
                                           pending_id=hold.transfer_id, created_ms=now_ms))
            self._notice(account, before, now_ms)
            hold.status = POSTED
        hold.settlement, hold.cost_nanos, hold.settled_ms = s, cost, now_ms
        self.changed_holds[hold.id] = hold
        self.usage.append(UsageRow(account_id=account.id, hold_id=hold.id, request_id=s.request_id or hold.request_id,
                                   key_id=hold.key_id, model=hold.model, created_ms=s.ended_ms or now_ms,
                                   units=charged, cost_nanos=cost, outcome=s.outcome))
        return SettleResult(s.hold_id, SettleStatus.POSTED if s.outcome != FAILED else SettleStatus.VOIDED, cost,
                            capped=charged is not s.units)

    def claim(self, hold_id: str, now_ms: int) -> bool:
        """A router runs the call: a pending hold lives the full lifetime from now (a claim
        renewed while the call runs keeps it). Settled, expired and unknown holds are left
        as they are, and a claim never shortens one (the SQL store runs the same rule as one
        UPDATE: ledger_svc.store.SqlStore.claim_holds)."""
        hold = self.holds.get(hold_id)
        if hold is None or hold.status != PENDING:
            return False
        expires_ms = self.policy.claimed_expiry_ms(now_ms)
        if hold.expires_ms >= expires_ms:
            return False
        hold.expires_ms = expires_ms
        return True

    def expire(self, hold_id: str, now_ms: int) -> bool:
        """Voids a pending hold past its expiry, so it stops reducing the available balance."""
        hold = self.holds.get(hold_id)
        if hold is None or hold.status != PENDING or hold.expires_ms > now_ms:
            return False
        self._move(hold.account_id, SYS_REVENUE, -hold.amount_nanos, pending=True)
        self.transfers.append(Transfer(id="expire:" + hold.id, kind=EXPIRE, debit_account_id=hold.account_id,
                                       credit_account_id=SYS_REVENUE, amount_nanos=hold.amount_nanos,
                                       pending_id=hold.transfer_id, created_ms=now_ms))
        hold.status = EXPIRED
        self.changed_holds[hold.id] = hold
        return True


# --- prices -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PriceVersion:
    model: str
    version: int
    effective_from_s: int
    prices: Mapping[str, int]
    # common.pricing.encode_header(prices), computed once: the x-ts-price header.
    header: str = ""

    @classmethod
    def of(cls, model: str, version: int, effective_from_s: int, prices: Mapping[str, int]) -> "PriceVersion":
        return cls(model, version, effective_from_s, dict(prices), pricing.encode_header(prices))


class PriceBook:
    """Every price version of every model; the one in effect at a time is the latest
    version among those whose effective_from has come."""

    def __init__(self, versions: Iterable[PriceVersion] = ()) -> None:
        self._by_model: dict[str, list[PriceVersion]] = {}
        for version in versions:
            self._by_model.setdefault(version.model, []).append(version)
        for history in self._by_model.values():
            history.sort(key=lambda v: (v.effective_from_s, v.version))

    def current(self, model: str, now_s: int) -> PriceVersion | None:
        for version in reversed(self._by_model.get(model, ())):
            if version.effective_from_s <= now_s:
                return version
        return None

    def models(self) -> list[str]:
        return sorted(self._by_model)

    def next_version(self, model: str) -> int:
        return max((v.version for v in self._by_model.get(model, ())), default=0) + 1


def price_changes(book: PriceBook, list_prices: Mapping[str, Mapping[str, int]], now_s: int) -> dict[str, dict]:
    """The models whose catalog list price differs from the price in effect now."""
    changed = {}
    for model, prices in sorted(list_prices.items()):
        current = book.current(model, now_s)
        if current is None or dict(current.prices) != dict(prices):
            changed[model] = dict(prices)
    return changed


def check_price(model: str, prices: Mapping[str, int], effective_from_s: int, now_s: int,
                allowed_units: Iterable[str]) -> None:
    allowed = set(allowed_units)
    if not prices:
        raise InvalidArgument("pricing must name at least one unit", code="invalid_pricing", param="pricing")
    for unit, nanos in prices.items():
        if unit not in allowed:
            raise InvalidArgument(f"{model} is priced in {', '.join(sorted(allowed))}, not {unit}",
                                  code="invalid_pricing", param="pricing")
        if nanos < 0:
            raise InvalidArgument(f"price {unit} is negative", code="invalid_pricing", param="pricing")
    if effective_from_s < now_s:
        raise InvalidArgument("effective_from must not be in the past (0 means now)",
                              code="invalid_effective_from", param="effective_from")


# --- worst cases ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextCall:
    """What a text call's worst case depends on, read from its request body.

    `text_bytes` is the UTF-8 size of all text the model reads; `segments` the
    number of chat messages (or completion prompts); `choices` is n (best_of
    for completions, whichever is larger); `max_tokens` the caller's output cap
    (max_completion_tokens first, then max_tokens); `per_segment_output`: a
    completions call produces its choices once per prompt.
    """

    model: str
    text_bytes: int
    segments: int
    choices: int | None
    max_tokens: int | None
    per_segment_output: bool = False
    # Content parts other than text (ledger_svc.check.InputPart), as read from the body;
    # `part_tokens` is what they hold once the model's rules price them.
    parts: tuple = dataclasses.field(default=(), compare=False)
    part_tokens: int = 0


def output_cap(limits: Mapping[str, int]) -> int:
    cap = limits.get("max_output_tokens") or limits.get("context_window") or OUTPUT_TOKENS_FALLBACK
    return max(1, cap)


def worst_text_units(call: TextCall, limits: Mapping[str, int]) -> Units:
    """The most a text call can consume: every byte of text a token, plus framing, and every
    choice running to its output cap. Values router_svc would refuse (negative, zero, absurd)
    are clamped here to the most expensive admissible value, so the hold is never too small."""
    cap = output_cap(limits)
    per_choice = cap if call.max_tokens is None or call.max_tokens <= 0 else min(call.max_tokens, cap)
    choices = 1 if call.choices is None or call.choices <= 0 else min(call.choices, CHOICES_MAX)
    segments = max(call.segments, 0)
    input_tokens = (max(call.text_bytes, 0) + TOKENS_PER_MESSAGE * segments + TOKENS_PER_CALL
                    + max(call.part_tokens, 0))
    outputs = max(segments, 1) if call.per_segment_output else 1
    return Units(input_tokens=input_tokens, output_tokens=outputs * choices * per_choice)


def within_amount(prices: Mapping[str, int], units: Units, amount_nanos: int) -> Units:
    """The units a charge of at most `amount_nanos` pays for: `units` when they fit, else each
    priced field in CUT_ORDER cut in turn, to zero or to the largest count that still fits, so
    the result is never above `units` in any field and prices to at most the amount."""
    usage = units.as_usage()
    if pricing.cost_nanos(prices, usage) <= amount_nanos:
        return units
    priced = {pricing.UNITS[unit][0] for unit, price in prices.items() if price > 0}
    for field in CUT_ORDER:
        if field not in priced or not usage[field]:
            continue
        full, usage[field] = usage[field], 0
        if pricing.cost_nanos(prices, usage) > amount_nanos:
            continue  # too much even without any of it: all of it goes, and the next field is cut
        # cost(low) <= amount < cost(high); at most 64 halvings for a BIGINT count.
        low, high = 0, full
        while high - low > 1:
            usage[field] = (low + high) // 2
            if pricing.cost_nanos(prices, usage) <= amount_nanos:
                low = usage[field]
            else:
                high = usage[field]
        usage[field] = low
        break
    return Units(**usage)


def worst_cost_nanos(prices: Mapping[str, int], units: Units) -> int:
    return pricing.cost_nanos(prices, units.as_usage())


# --- usage queries ----------------------------------------------------------------------

USAGE_LIMIT_DEFAULT = 100
USAGE_LIMIT_MAX = 1000
USAGE_WINDOW_DEFAULT_S = 30 * 86400
USAGE_WINDOW_MAX_S = 400 * 86400


@dataclasses.dataclass(frozen=True)
class UsageQuery:
    account_id: str
    start_ms: int
    end_ms: int
    limit: int
    after_id: int | None
    key_id: str
    model: str


def usage_query(account_id: str, start_s: int, end_s: int, limit: int, after_id: int | None,
                key_id: str, model: str, now_ms: int) -> UsageQuery:
    """Defaults and bounds of a ListUsage request (InvalidArgument when out of bounds)."""
    end_ms = end_s * 1000 if end_s > 0 else now_ms + 1
    start_ms = start_s * 1000 if start_s > 0 else end_ms - USAGE_WINDOW_DEFAULT_S * 1000
    if start_s < 0 or end_s < 0 or start_ms >= end_ms:
        raise InvalidArgument("start must be before end (Unix seconds)", code="invalid_time_range", param="start")
    if end_ms - start_ms > USAGE_WINDOW_MAX_S * 1000:
        raise InvalidArgument(f"a time range spans at most {USAGE_WINDOW_MAX_S // 86400} days",
                              code="invalid_time_range", param="start")
    if limit < 0 or limit > USAGE_LIMIT_MAX:
        raise InvalidArgument(f"limit must be between 1 and {USAGE_LIMIT_MAX}", code="invalid_limit", param="limit")
    return UsageQuery(account_id, start_ms, end_ms, limit or USAGE_LIMIT_DEFAULT, after_id, key_id, model)


Clock = Callable[[], int]
