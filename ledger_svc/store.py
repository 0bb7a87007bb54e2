"""The journal in SQL (SQLAlchemy Core tables; SQLite or PostgreSQL) and the Protocol the server needs.

Holds and settlements go through a group-commit batcher (ledger_svc.batcher):
one transaction per batch locks the holds it settles, then the customer
accounts it touches (both in id order, so replicas never deadlock), lets a
domain.Book decide every operation in arrival order, and writes the result in
few statements: on PostgreSQL one statement of data-modifying CTEs fed with
one JSON parameter per table, on SQLite one executemany per table. Row locks
(SELECT ... FOR NO KEY UPDATE on PostgreSQL; SQLite's single writer) make
admission and the hold atomic per account across replicas. System accounts
are updated by increments at the end of the transaction, so their hot rows
stay locked only for the last statement and the commit.

Payments, adjustments and signups are rare: they run through SQLAlchemy Core
in a transaction of their own, under the same locks.
"""
import asyncio
import dataclasses
import functools
import json
import logging
import operator
import time
import types
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import pricing
from ledger_svc import batcher, domain, metrics, reconcile

metadata = sa.MetaData()
_ID = sa.String(200)
_ACCOUNT_ID = sa.String(128)
_PK_BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _units_columns(nullable: bool = False) -> list[sa.Column]:
    return [sa.Column(name, sa.BigInteger, nullable=nullable, server_default="0") for name in domain.UNIT_FIELDS]


accounts = sa.Table(
    "ledger_accounts", metadata,
    sa.Column("id", _ACCOUNT_ID, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("email", sa.String(domain.EMAIL_LENGTH_MAX), nullable=False, server_default=""),
    sa.Column("debits_pending", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("debits_posted", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("credits_pending", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("credits_posted", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("low_notified", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("zero_notified", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

# Immutable: rows are only ever inserted.
transfers = sa.Table(
    "ledger_transfers", metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("debit_account_id", _ACCOUNT_ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
    sa.Column("credit_account_id", _ACCOUNT_ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
    sa.Column("amount_nanos", sa.BigInteger, nullable=False),
    sa.Column("pending_id", _ID, nullable=False, server_default=""),
    sa.Column("reason", sa.String(domain.REASON_LENGTH_MAX), nullable=False, server_default=""),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

# The state of each two-phase transfer ("hold:<id>" in transfers) and how it was settled.
holds = sa.Table(
    "ledger_holds", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("account_id", _ACCOUNT_ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
    sa.Column("key_id", sa.String(128), nullable=False, server_default=""),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("request_id", sa.String(200), nullable=False, server_default=""),
    sa.Column("prices", sa.String(1000), nullable=False),
    sa.Column("price_version", sa.Integer, nullable=False),
    sa.Column("amount_nanos", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("expires_ms", sa.BigInteger, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=True),
    *_units_columns(),
    sa.Column("settled_request_id", sa.String(200), nullable=False, server_default=""),
    sa.Column("ended_ms", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("cost_nanos", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("settled_ms", sa.BigInteger, nullable=False, server_default="0"),
    sa.Index("ix_ledger_holds_pending_expiry", "expires_ms",
             postgresql_where=sa.text("status = 'pending'"), sqlite_where=sa.text("status = 'pending'")),
)

prices = sa.Table(
    "ledger_prices", metadata,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("unit", sa.String(64), primary_key=True),
    sa.Column("price_nanos", sa.BigInteger, nullable=False),
    sa.Column("effective_from_s", sa.BigInteger, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

usage = sa.Table(
    "ledger_usage", metadata,
    sa.Column("id", _PK_BIGINT, primary_key=True, autoincrement=True),
    sa.Column("account_id", _ACCOUNT_ID, nullable=False),
    sa.Column("hold_id", sa.String(64), nullable=False, unique=True),
    sa.Column("request_id", sa.String(200), nullable=False, server_default=""),
    sa.Column("key_id", sa.String(128), nullable=False, server_default=""),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    # YYYY-MM-DD (UTC) of created_ms, so daily totals group the same way on every engine.
    sa.Column("day", sa.String(10), nullable=False),
    *_units_columns(),
    sa.Column("cost_nanos", sa.BigInteger, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Index("ix_ledger_usage_account_id", "account_id", "id"),
    sa.Index("ix_ledger_usage_account_created", "account_id", "created_ms"),
)


def _outbox(name: str, *columns: sa.Column) -> sa.Table:
    return sa.Table(
        name, metadata,
        sa.Column("id", _PK_BIGINT, primary_key=True, autoincrement=True),
        *columns,
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        # pending, sent or failed (given up after the bounded retries).
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_ms", sa.BigInteger, nullable=False, server_default="0"),
        # Who is sending it now: a sender claims rows with a lease (next_attempt_ms).
        sa.Column("claim", sa.String(32), nullable=False, server_default=""),
        sa.Column("last_error", sa.String(500), nullable=False, server_default=""),
        sa.Column("done_ms", sa.BigInteger, nullable=False, server_default="0"),
        sa.Index(f"ix_{name}_due", "status", "next_attempt_ms"),
    )


email_outbox = _outbox(
    "ledger_email_outbox",
    sa.Column("account_id", _ACCOUNT_ID, nullable=False),
    sa.Column("to_addr", sa.String(domain.EMAIL_LENGTH_MAX), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("balance_nanos", sa.BigInteger, nullable=False),
    # Billing's emails (a failed top-up, a tier change): what they say, as a JSON object,
    # and a key that makes queueing the same email twice a no-op (NULL for balance notices).
    sa.Column("details", sa.Text, nullable=False, server_default=""),
    sa.Column("dedupe_key", sa.String(200), nullable=True),
    sa.Index("ux_ledger_email_outbox_dedupe_key", "dedupe_key", unique=True),
)

# Billing (ledger_svc.stripe_store): each account's Stripe customer, and every top-up.
billing_customers = sa.Table(
    "billing_customers", metadata,
    sa.Column("account_id", _ACCOUNT_ID, sa.ForeignKey("ledger_accounts.id"), primary_key=True),
    sa.Column("customer_id", sa.String(64), nullable=False, unique=True),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

billing_topups = sa.Table(
    "billing_topups", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("account_id", _ACCOUNT_ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
    sa.Column("amount_nanos", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("payment_method", sa.String(64), nullable=False),
    sa.Column("card_brand", sa.String(32), nullable=False, server_default=""),
    sa.Column("card_last4", sa.String(4), nullable=False, server_default=""),
    # pending, requires_action, succeeded or failed (ledger_svc.billing).
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("failure_message", sa.String(500), nullable=False, server_default=""),
    sa.Column("payment_intent_id", sa.String(64), nullable=True, unique=True),
    sa.Column("client_secret", sa.String(200), nullable=False, server_default=""),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("credited_ms", sa.BigInteger, nullable=False, server_default="0"),
    # The upgrade to Paid that the account's first credited top-up owes: "" (none owed),
    # pending (auth_svc not told yet: retried) or done.
    sa.Column("tier_status", sa.String(16), nullable=False, server_default=""),
    sa.Column("tier_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tier_next_attempt_ms", sa.BigInteger, nullable=False, server_default="0"),
    sa.Index("ix_billing_topups_account", "account_id", "created_ms"),
    sa.Index("ix_billing_topups_tier", "tier_status", "tier_next_attempt_ms"),
)

lago_outbox = _outbox(
    "ledger_lago_outbox",
    sa.Column("transaction_id", sa.String(200), nullable=False),
    sa.Column("account_id", _ACCOUNT_ID, nullable=False),
    sa.Column("event_ms", sa.BigInteger, nullable=False),
    sa.Column("cost_nanos", sa.BigInteger, nullable=False),
    # JSON object: the model and every unit (Lago's event properties).
    sa.Column("properties", sa.Text, nullable=False),
)


# --- what the server needs --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UsagePage:
    rows: list[tuple[int, domain.UsageRow]]
    daily: list[tuple[str, str, int, domain.Units, int]]  # day, model, requests, units, cost
    has_more: bool


@dataclasses.dataclass(frozen=True)
class JournalStats:
    accounts: int
    transfers: int
    pending_holds: int
    sum_of_balances_nanos: int
    debits_pending_nanos: int
    credits_pending_nanos: int
    outbox_emails: int
    outbox_lago: int


@dataclasses.dataclass(frozen=True)
class OutboxJob:
    id: int
    attempts: int
    fields: Mapping


class Store(Protocol):
    price_book: domain.PriceBook

    async def open_account(self, account_id: str, email: str) -> domain.Account: ...
    async def get_account(self, account_id: str) -> domain.Account | None: ...
    async def credit(self, account_id: str, amount_nanos: int, transfer_id: str, reason: str,
                     kind: str) -> tuple[domain.TransferResult, domain.Account | None]: ...
    async def hold(self, request: domain.HoldRequest) -> domain.HoldDecision: ...
    async def settle(self, settlements: Sequence[domain.Settlement]) -> list[domain.SettleResult]: ...
    async def expire_due(self, limit: int) -> int: ...
    async def claim_holds(self, hold_ids: Sequence[str]) -> int: ...
    async def refresh_prices(self) -> domain.PriceBook: ...
    async def set_price(self, model: str, prices: Mapping[str, int], effective_from_s: int) -> domain.PriceVersion: ...
    async def seed_prices(self, list_prices: Mapping[str, Mapping[str, int]]) -> list[domain.PriceVersion]: ...
    async def list_usage(self, query: domain.UsageQuery) -> UsagePage: ...
    async def journal_stats(self) -> JournalStats: ...
    async def claim(self, outbox: str, limit: int, lease_ms: int) -> list[OutboxJob]: ...
    async def finish(self, outbox: str, job_ids: Sequence[int], *, sent: bool, error: str = "",
                     retry_at_ms: int | None = None) -> None: ...


# --- batch operations -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class _HoldOp:
    request: domain.HoldRequest


@dataclasses.dataclass(frozen=True, slots=True)
class _SettleOp:
    settlements: Sequence[domain.Settlement]


@dataclasses.dataclass(frozen=True, slots=True)
class _ExpireOp:
    hold_ids: Sequence[str]


log = logging.getLogger(__name__)
RETRIES = 3
OUTBOXES = {"email": email_outbox, "lago": lago_outbox}
# A failed delivery is tried again after 2, 4, 8 ... seconds, at most this far apart.
OUTBOX_BACKOFF_MAX_S = 600


def outbox_backoff_ms(attempts: int) -> int:
    return min(2 ** attempts, OUTBOX_BACKOFF_MAX_S) * 1000


async def drain_outbox(run_once, ready: asyncio.Event, batch: int, poll_s: float, what: str) -> None:
    """An outbox's sender, forever: `run_once` (how many rows it handled) again while it finds
    full batches, else wait until a commit queues more (`ready`) or `poll_s` passes."""
    while True:
        try:
            handled = await run_once()
        except Exception as error:  # noqa: BLE001 - a database hiccup must not end the sender
            log.warning(f"{what} outbox pass failed", extra={"error": repr(error)})
            handled = 0
        if handled >= batch:
            continue
        ready.clear()
        try:
            await asyncio.wait_for(ready.wait(), poll_s)
        except TimeoutError:
            pass


class SqlStore:
    """The Store on an SQLAlchemy async engine (common.db.make_engine)."""

    def __init__(self, engine: AsyncEngine, clock: domain.Clock, *, signup_credit_nanos: int,
                 low_balance_nanos: int, hold_ttl_s: int, hold_claim_s: int = 0, export_lago: bool = False,
                 batch_max: int = 1000, batch_linger_ms: float = 1.0, queue_max: int = 20_000,
                 batch_workers: int = 1) -> None:
        self._engine = engine
        self._clock = clock
        self._signup_nanos = signup_credit_nanos
        self._policy = domain.Policy(low_balance_nanos=low_balance_nanos, hold_ttl_ms=hold_ttl_s * 1000,
                                     unclaimed_ttl_ms=hold_claim_s * 1000)
        self._export_lago = export_lago
        self._postgres = engine.dialect.name == "postgresql"
        self._batch_connections: dict[asyncio.Task, tuple] = {}
        # SQLite has one connection (one writer): one worker. On PostgreSQL more workers overlap
        # batches, but measured on two cores one worker's larger batches cost less CPU per call.
        self._batcher = batcher.Batcher(self._apply, max_weight=batch_max, linger_s=batch_linger_ms / 1000,
                                        queue_max=queue_max, workers=batch_workers if self._postgres else 1)
        self.price_book = domain.PriceBook()
        # Set after a commit that queued emails or Lago events: the senders wake at once.
        self.emails_ready = asyncio.Event()
        self.lago_ready = asyncio.Event()

    @property
    def batcher(self) -> batcher.Batcher:
        return self._batcher

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        await self._batcher.close()
        for conn, _driver in self._batch_connections.values():
            await conn.close()
        self._batch_connections.clear()

    # --- accounts and transfers ---

    async def open_account(self, account_id: str, email: str) -> domain.Account:
        domain.check_account_id(account_id)
        if len(email) > domain.EMAIL_LENGTH_MAX:
            raise domain.InvalidArgument("email is too long", code="invalid_email", param="email")

        async def work(conn: AsyncConnection) -> domain.Account:
            now = self._clock()
            found = await self._lock_accounts(conn, [account_id])
            account = found.get(account_id)
            if account is None:
                await conn.execute(accounts.insert().values(id=account_id, kind=domain.CUSTOMER, email=email,
                                                            created_ms=now))
                account = found[account_id] = domain.Account(account_id, email=email)
            elif email and account.email != email:
                await conn.execute(accounts.update().where(accounts.c.id == account_id).values(email=email))
                account.email = email
            if self._signup_nanos > 0:
                grant = domain.signup_grant(account_id, self._signup_nanos, now)
                book = domain.Book(found, {}, self._policy)
                # A rejection here (a grant under another amount, before a settings change)
                # still means the account got its grant: once is once.
                result = book.post_transfer(grant, await self._load_transfer(conn, grant.id))
                if result is domain.TransferResult.CREATED:
                    await self._write_transfers(conn, book)
            return account

        return await self._transaction(work)

    async def get_account(self, account_id: str) -> domain.Account | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(accounts).where(accounts.c.id == account_id))).first()
        return _account(row._mapping) if row is not None else None

    async def credit(self, account_id: str, amount_nanos: int, transfer_id: str, reason: str,
                     kind: str, *, also=None) -> tuple[domain.TransferResult, domain.Account | None]:
        """`also(conn, result)`, when given, runs in the same transaction after an accepted
        transfer (created or exists): billing records the top-up it paid for with it."""
        rejected = domain.check_credit(transfer_id, kind, amount_nanos, reason)
        if rejected is not None:
            return rejected, None

        async def work(conn: AsyncConnection):
            found = await self._lock_accounts(conn, [account_id])
            transfer = domain.credit_transfer(account_id, amount_nanos, transfer_id, reason, kind, self._clock())
            book = domain.Book(found, {}, self._policy)
            result = book.post_transfer(transfer, await self._load_transfer(conn, transfer_id))
            if result is domain.TransferResult.CREATED:
                await self._write_transfers(conn, book)
            if also is not None and result.ok:
                await also(conn, result)
            return result, found.get(account_id), book

        result, account, book = await self._transaction(work)
        self._wake(book)
        return result, account

    async def _transaction(self, work):
        """Runs `work` in a transaction, again if a concurrent insert of the same key won the race."""
        for attempt in range(RETRIES):
            try:
                async with self._engine.begin() as conn:
                    return await work(conn)
            except sa_exc.IntegrityError:
                if attempt == RETRIES - 1:
                    raise

    # --- holds and settlements (batched) ---

    async def hold(self, request: domain.HoldRequest) -> domain.HoldDecision:
        return await self._batcher.submit(_HoldOp(request))

    async def settle(self, settlements: Sequence[domain.Settlement]) -> list[domain.SettleResult]:
        if not settlements:
            return []
        return await self._batcher.submit(_SettleOp(tuple(settlements)), weight=len(settlements))

    async def expire_due(self, limit: int = 500) -> int:
        """Voids up to `limit` pending holds whose expiry has passed; returns how many."""
        now = self._clock()
        async with self._engine.connect() as conn:
            ids = (await conn.execute(
                sa.select(holds.c.id).where(holds.c.status == domain.PENDING, holds.c.expires_ms <= now)
                .order_by(holds.c.expires_ms).limit(limit))).scalars().all()
        if not ids:
            return 0
        return await self._batcher.submit(_ExpireOp(tuple(ids)), weight=len(ids))

    async def claim_holds(self, hold_ids: Sequence[str]) -> int:
        """domain.Book.claim for many holds as one UPDATE: it touches no balance, so it
        needs no batch. A batch settling or expiring one of them holds its row lock
        (PostgreSQL) or the write lock (SQLite) and has committed first, and then the
        hold is no longer pending; a batch never writes expires_ms back."""
        ids = sorted(set(hold_ids))
        if not ids:
            return 0
        claimed_expiry = self._policy.claimed_expiry_ms(self._clock())
        # Rows are locked in id order, as a batch locks them, so the two never deadlock.
        due = (sa.select(holds.c.id).where(holds.c.id.in_(ids), holds.c.status == domain.PENDING,
                                           holds.c.expires_ms < claimed_expiry)
               .order_by(holds.c.id).with_for_update(key_share=True))
        async with self._engine.begin() as conn:
            result = await conn.execute(holds.update().where(holds.c.id.in_(due.scalar_subquery()))
                                        .values(expires_ms=claimed_expiry))
        return result.rowcount

    async def _apply(self, ops: Sequence) -> list:
        now = self._clock()
        hold_ids: set[str] = set()
        account_ids: set[str] = set()
        for op in ops:
            if type(op) is _HoldOp:
                account_ids.add(op.request.account_id)
                if op.request.hold_id:
                    hold_ids.add(op.request.hold_id)
            elif type(op) is _SettleOp:
                hold_ids.update(s.hold_id for s in op.settlements if s.hold_id)
            else:
                hold_ids.update(op.hold_ids)
        started = time.perf_counter()
        if self._postgres:
            results, book = await self._apply_postgres(ops, sorted(hold_ids), account_ids, now)
        else:
            results, book = await self._apply_sqlite(ops, sorted(hold_ids), account_ids, now)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_OPERATIONS.observe(len(ops))
        self._wake(book)
        return results

    async def _apply_sqlite(self, ops: Sequence, hold_ids: list[str], account_ids: set[str],
                            now: int) -> tuple[list, domain.Book]:
        """The batch on SQLite (common.db's inline engine): write_driver() takes the one write
        lock (BEGIN IMMEDIATE: other processes on the file wait), then one executemany per
        table on the sqlite3 connection itself, which runs it in C."""
        async with self._engine.write_driver() as lite:
            loaded = {}
            if hold_ids:
                loaded = {row["id"]: _hold(row) for row in _fetch(lite, _LITE_HOLDS, json.dumps(hold_ids))}
                account_ids.update(hold.account_id for hold in loaded.values())
            found = {}
            if account_ids:
                found = {row["id"]: _account(row)
                         for row in _fetch(lite, _LITE_ACCOUNTS, json.dumps(sorted(account_ids)))}
            book = domain.Book(found, loaded, self._policy)
            results = _decide(book, ops, now)
            for (sql, names), rows in zip(_LITE_WRITES, self._batch_rows(book)):
                if rows:
                    lite.executemany(sql, _tuples(rows, names))
        return results, book

    def _batch_rows(self, book: domain.Book) -> list[list[dict]]:
        """What a batch writes, one list of rows per statement, in the order both engines
        take them (_LITE_WRITES; _PG_WRITE's $1..$7)."""
        new_ids = {hold.id for hold in book.new_holds}
        changed = [hold for hold in book.changed_holds.values() if hold.id not in new_ids]
        lago = [row for row in book.usage if row.outcome != domain.FAILED] if self._export_lago else []
        return [[_hold_row(h) for h in book.new_holds], [_hold_update(h) for h in changed],
                [_transfer_row(t) for t in book.transfers], [_usage_row(u) for u in book.usage],
                [_notice_row(n) for n in book.notices], [_lago_row(u) for u in lago],
                [_account_delta(book, account_id) for account_id in sorted(book.deltas)]]

    async def _apply_postgres(self, ops: Sequence, hold_ids: list[str], account_ids: set[str],
                              now: int) -> tuple[list, domain.Book]:
        """The batch on PostgreSQL in five round trips (BEGIN, lock holds, lock accounts, write,
        COMMIT) on the worker's own asyncpg connection: every write is one statement of
        data-modifying CTEs, each table's rows one JSON parameter. SQLAlchemy's per-statement
        and per-row cost was most of a batch's CPU, and CPU is what a two-core box runs out of."""
        pg = await self._driver_connection()
        try:
            async with pg.transaction():
                loaded = {}
                if hold_ids:
                    loaded = {row["id"]: _hold(row) for row in await pg.fetch(_PG_LOCK_HOLDS, hold_ids)}
                    account_ids.update(hold.account_id for hold in loaded.values())
                accounts_found = {}
                if account_ids:
                    accounts_found = {row["id"]: _account(row)
                                      for row in await pg.fetch(_PG_LOCK_ACCOUNTS, sorted(account_ids))}
                book = domain.Book(accounts_found, loaded, self._policy)
                results = _decide(book, ops, now)
                await pg.execute(_PG_WRITE, *map(json.dumps, self._batch_rows(book)))
        except BaseException:
            # Whatever went wrong, the next batch starts on a fresh connection.
            await self._drop_driver_connection()
            raise
        return results, book

    async def _driver_connection(self):
        """The batch worker's own connection, kept between batches: a pool checkout pings."""
        task = asyncio.current_task()
        held = self._batch_connections.get(task)
        if held is None:
            conn = await self._engine.connect()
            driver = (await conn.get_raw_connection()).driver_connection
            # A generic plan cannot know how many ids an array holds and was seen scanning
            # the whole holds table; a plan per call costs less than that.
            await driver.execute("SET plan_cache_mode = force_custom_plan")
            held = self._batch_connections[task] = (conn, driver)
        return held[1]

    async def _drop_driver_connection(self) -> None:
        held = self._batch_connections.pop(asyncio.current_task(), None)
        if held is not None:
            try:
                await held[0].invalidate()
                await held[0].close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

    async def _lock_accounts(self, conn: AsyncConnection, ids: Sequence[str]) -> dict[str, domain.Account]:
        if not ids:
            return {}
        rows = await conn.execute(sa.select(accounts).where(accounts.c.id.in_(ids))
                                  .order_by(accounts.c.id).with_for_update(key_share=True))
        return {row.id: _account(row._mapping) for row in rows}

    async def _load_transfer(self, conn: AsyncConnection, transfer_id: str) -> domain.Transfer | None:
        row = (await conn.execute(sa.select(transfers).where(transfers.c.id == transfer_id))).first()
        if row is None:
            return None
        return domain.Transfer(id=row.id, kind=row.kind, debit_account_id=row.debit_account_id,
                               credit_account_id=row.credit_account_id, amount_nanos=row.amount_nanos,
                               pending_id=row.pending_id, reason=row.reason, created_ms=row.created_ms)

    async def _write_transfers(self, conn: AsyncConnection, book: domain.Book) -> None:
        """Writes what a single-phase transfer (grant, payment, adjustment) changed: the
        transfer, any notice, and the accounts' increments (customers carry their flags)."""
        assert not (book.new_holds or book.changed_holds or book.usage), "holds go through the batcher"
        book.assert_balanced()
        await conn.execute(transfers.insert(), [_transfer_row(t) for t in book.transfers])
        if book.notices:
            await conn.execute(email_outbox.insert(), [_notice_row(n) for n in book.notices])
        await conn.execute(_UPDATE_ACCOUNT, [_account_delta(book, account_id) for account_id in sorted(book.deltas)])

    def _wake(self, book: domain.Book) -> None:
        if book.notices:
            self.emails_ready.set()
        if self._export_lago and book.usage:
            self.lago_ready.set()

    # --- prices ---

    async def refresh_prices(self) -> domain.PriceBook:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(prices).order_by(prices.c.model, prices.c.version))).all()
        grouped: dict[tuple[str, int], tuple[int, dict[str, int]]] = {}
        for row in rows:
            effective, units = grouped.setdefault((row.model, row.version), (row.effective_from_s, {}))
            units[row.unit] = row.price_nanos
        self.price_book = domain.PriceBook(domain.PriceVersion.of(model, version, effective, units)
                                           for (model, version), (effective, units) in grouped.items())
        return self.price_book

    async def set_price(self, model: str, unit_prices: Mapping[str, int], effective_from_s: int) -> domain.PriceVersion:
        async def work(conn: AsyncConnection) -> domain.PriceVersion:
            latest = (await conn.execute(sa.select(sa.func.max(prices.c.version))
                                         .where(prices.c.model == model))).scalar()
            version = domain.PriceVersion.of(model, (latest or 0) + 1, effective_from_s, unit_prices)
            now = self._clock()
            await conn.execute(prices.insert(), [
                {"model": model, "version": version.version, "unit": unit, "price_nanos": nanos,
                 "effective_from_s": effective_from_s, "created_ms": now} for unit, nanos in unit_prices.items()])
            return version

        version = await self._transaction(work)
        await self.refresh_prices()
        return version

    async def seed_prices(self, list_prices: Mapping[str, Mapping[str, int]]) -> list[domain.PriceVersion]:
        """Start-up: a new version, effective now, for each model whose list price changed."""
        book = await self.refresh_prices()
        now_s = self._clock() // 1000
        added = []
        for model, unit_prices in domain.price_changes(book, list_prices, now_s).items():
            # Another replica starting at the same moment may have just added it.
            current = (await self.refresh_prices()).current(model, now_s)
            if current is None or dict(current.prices) != unit_prices:
                added.append(await self.set_price(model, unit_prices, now_s))
        return added

    # --- reading ---

    async def list_usage(self, query: domain.UsageQuery) -> UsagePage:
        where = [usage.c.account_id == query.account_id, usage.c.created_ms >= query.start_ms,
                 usage.c.created_ms < query.end_ms]
        if query.key_id:
            where.append(usage.c.key_id == query.key_id)
        if query.model:
            where.append(usage.c.model == query.model)
        page_where = where + ([usage.c.id < query.after_id] if query.after_id is not None else [])
        sums = [sa.func.sum(usage.c[name]).label(name) for name in domain.UNIT_FIELDS]
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(usage).where(*page_where).order_by(usage.c.id.desc())
                                       .limit(query.limit + 1))).all()
            daily = (await conn.execute(
                sa.select(usage.c.day, usage.c.model, sa.func.count().label("requests"), *sums,
                          sa.func.sum(usage.c.cost_nanos).label("cost_nanos"))
                .where(*where).group_by(usage.c.day, usage.c.model).order_by(usage.c.day, usage.c.model))).all()
        page = [(row.id, _usage(row._mapping)) for row in rows[:query.limit]]
        days = [(row.day, row.model, row.requests, _units(row._mapping), int(row.cost_nanos)) for row in daily]
        return UsagePage(rows=page, daily=days, has_more=len(rows) > query.limit)

    async def journal_stats(self) -> JournalStats:
        async with self._engine.connect() as conn:
            totals = (await conn.execute(sa.select(
                sa.func.count(), sa.func.coalesce(sa.func.sum(accounts.c.credits_posted - accounts.c.debits_posted), 0),
                sa.func.coalesce(sa.func.sum(accounts.c.debits_pending), 0),
                sa.func.coalesce(sa.func.sum(accounts.c.credits_pending), 0)))).one()
            n_transfers = (await conn.execute(sa.select(sa.func.count()).select_from(transfers))).scalar()
            pending = (await conn.execute(sa.select(sa.func.count()).select_from(holds)
                                          .where(holds.c.status == domain.PENDING))).scalar()
            emails = (await conn.execute(sa.select(sa.func.count()).select_from(email_outbox)
                                         .where(email_outbox.c.status == "pending"))).scalar()
            lago = (await conn.execute(sa.select(sa.func.count()).select_from(lago_outbox)
                                       .where(lago_outbox.c.status == "pending"))).scalar()
        return JournalStats(accounts=totals[0], transfers=n_transfers, pending_holds=pending,
                            sum_of_balances_nanos=int(totals[1]), debits_pending_nanos=int(totals[2]),
                            credits_pending_nanos=int(totals[3]), outbox_emails=emails, outbox_lago=lago)

    async def transfers_of(self, account_id: str, limit: int = 1000) -> list[domain.Transfer]:
        """An account's journal entries, oldest first (operators and tests)."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(transfers).where(sa.or_(transfers.c.debit_account_id == account_id,
                                                  transfers.c.credit_account_id == account_id))
                .order_by(transfers.c.created_ms, transfers.c.id).limit(limit))).all()
        return [domain.Transfer(id=r.id, kind=r.kind, debit_account_id=r.debit_account_id,
                                credit_account_id=r.credit_account_id, amount_nanos=r.amount_nanos,
                                pending_id=r.pending_id, reason=r.reason, created_ms=r.created_ms) for r in rows]

    async def get_hold(self, hold_id: str) -> domain.Hold | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(holds).where(holds.c.id == hold_id))).first()
        return _hold(row._mapping) if row is not None else None

    # --- reconciliation (ledger_svc.reconcile.Source) ---

    async def scan_calls(self, since_ms: int, each) -> None:
        """Every hold created or settled since `since_ms` with its transfers and usage row, in
        pages of RECONCILE_PAGE by hold id. Each page is one statement of its own: on SQLite the
        one connection is free for the batches between two pages."""
        after = ""
        while True:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(_CALLS.where(holds.c.id > after).limit(RECONCILE_PAGE),
                                           {"since": since_ms})).all()
            each([_call_row(row._mapping) for row in rows])
            if len(rows) < RECONCILE_PAGE:
                return
            after = rows[-1].id
            await asyncio.sleep(0)

    async def stray_transfers(self, since_ms: int, limit: int) -> tuple[list[domain.Transfer], int]:
        """Hold, post, void and expire transfers since `since_ms` whose id names no hold."""
        return await self._limited(_STRAY_TRANSFERS, transfers.c.id, {"since": since_ms}, limit, _transfer)

    async def stray_usage(self, since_ms: int, limit: int) -> tuple[list[domain.UsageRow], int]:
        """Usage rows since `since_ms` whose hold does not exist."""
        return await self._limited(_STRAY_USAGE, usage.c.id, {"since": since_ms}, limit, _usage)

    async def scan_accounts(self, each) -> None:
        """Every account with the sums of its posted transfers and of its pending holds, read in
        one statement (one snapshot: a batch committing meanwhile cannot tear it)."""
        await self._scan(_ACCOUNT_TOTALS, {}, lambda rows: each([_account_row(row._mapping) for row in rows]))

    async def payments(self, since_ms: int, limit: int) -> list[reconcile.PaymentRow]:
        """Payment transfers since `since_ms`, each with billing's top-up row for its PaymentIntent."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(_PAYMENTS.limit(limit), {"since": since_ms})).all()
        return [reconcile.PaymentRow(transfer=_transfer(row._mapping), topup_id=row.topup_id or "",
                                     topup_status=row.topup_status or "", topup_amount_nanos=row.topup_amount or 0,
                                     topup_account_id=row.topup_account or "") for row in rows]

    async def uncredited_topups(self, since_ms: int, limit: int) -> tuple[list[reconcile.TopupRow], int]:
        """Top-ups marked succeeded since `since_ms` with no payment transfer for their PaymentIntent."""
        return await self._limited(_UNCREDITED_TOPUPS, billing_topups.c.id, {"since": since_ms}, limit,
                                   lambda row: reconcile.TopupRow(row["id"], row["account_id"], row["amount_nanos"],
                                                                  row["payment_intent_id"] or ""))

    async def accounts_of_customers(self, customer_ids) -> dict[str, str]:
        """Stripe customer id -> account id, for those of `customer_ids` that are ours."""
        ids = sorted(set(customer_ids))
        if not ids:
            return {}
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(billing_customers.c.customer_id, billing_customers.c.account_id)
                                       .where(billing_customers.c.customer_id.in_(ids)))).all()
        return {row.customer_id: row.account_id for row in rows}

    async def scan_settled_calls(self, since_ms: int, each) -> None:
        """Every call settled (not failed) since `since_ms` with the first Lago outbox row of its
        transaction id and how many there are, in one statement."""
        await self._scan(_SETTLED_CALLS, {"since": since_ms}, lambda rows: each([
            reconcile.SettledCall(_usage(row._mapping), _export(row._mapping, "o_") if row.o_id is not None else None,
                                  row.o_count or 0) for row in rows]))

    async def stray_exports(self, since_ms: int, limit: int) -> tuple[list[reconcile.Export], int]:
        """Lago outbox rows since `since_ms` whose transaction id is no settled call's."""
        return await self._limited(_STRAY_EXPORTS, lago_outbox.c.id, {"since": since_ms}, limit,
                                   lambda row: _export(row, ""))

    async def _limited(self, select: sa.Select, order, params: dict, limit: int, convert) -> tuple[list, int]:
        """The first `limit` rows of `select` (in `order`) and how many there are in all."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select.order_by(order).limit(limit), params)).all()
            total = len(rows)
            if total == limit:
                total = (await conn.execute(sa.select(sa.func.count()).select_from(select.subquery()), params)).scalar()
        return [convert(row._mapping) for row in rows], total

    async def _scan(self, select: sa.Select, params: dict, each) -> None:
        """Runs one statement and hands its rows to `each` RECONCILE_PAGE at a time, read from a
        server-side cursor on PostgreSQL (on SQLite the cursor steps through the file)."""
        async with self._engine.connect() as conn:
            if self._postgres:
                result = await conn.stream(select, params)
                async for rows in result.partitions(RECONCILE_PAGE):
                    each(rows)
            else:
                for rows in (await conn.execute(select, params)).partitions(RECONCILE_PAGE):
                    each(rows)

    # --- outboxes ---

    async def claim(self, outbox: str, limit: int, lease_ms: int) -> list[OutboxJob]:
        """Claims up to `limit` due rows for `lease_ms`: a sender that dies lets them come due again."""
        table = OUTBOXES[outbox]
        now = self._clock()
        token = uuid.uuid4().hex
        async with self._engine.begin() as conn:
            ids = (await conn.execute(sa.select(table.c.id).where(table.c.status == "pending",
                                                                  table.c.next_attempt_ms <= now)
                                      .order_by(table.c.id).limit(limit))).scalars().all()
            if not ids:
                return []
            # The condition is evaluated again under the row lock, so two replicas never both win a row.
            await conn.execute(table.update().where(table.c.id.in_(ids), table.c.status == "pending",
                                                    table.c.next_attempt_ms <= now)
                               .values(claim=token, next_attempt_ms=now + lease_ms, attempts=table.c.attempts + 1))
            rows = (await conn.execute(sa.select(table).where(table.c.id.in_(ids), table.c.claim == token)
                                       .order_by(table.c.id))).all()
        return [OutboxJob(id=row.id, attempts=row.attempts, fields=row._mapping) for row in rows]

    async def prune(self, outbox: str, older_than_ms: int, limit: int = 1000) -> int:
        """Deletes up to `limit` rows that were sent (or given up) before `older_than_ms`."""
        table = OUTBOXES[outbox]
        async with self._engine.begin() as conn:
            ids = (await conn.execute(sa.select(table.c.id).where(table.c.status != "pending",
                                                                  table.c.done_ms < older_than_ms)
                                      .order_by(table.c.id).limit(limit))).scalars().all()
            if ids:
                await conn.execute(table.delete().where(table.c.id.in_(ids)))
        return len(ids)

    async def finish(self, outbox: str, job_ids: Sequence[int], *, sent: bool, error: str = "",
                     retry_at_ms: int | None = None) -> None:
        """Marks claimed rows sent, due again at `retry_at_ms`, or failed for good (neither)."""
        if not job_ids:
            return
        table = OUTBOXES[outbox]
        if sent:
            values = {"status": "sent", "done_ms": self._clock(), "last_error": ""}
        elif retry_at_ms is not None:
            values = {"next_attempt_ms": retry_at_ms, "last_error": error[:500]}
        else:
            values = {"status": "failed", "done_ms": self._clock(), "last_error": error[:500]}
        async with self._engine.begin() as conn:
            await conn.execute(table.update().where(table.c.id.in_(list(job_ids))).values(**values, claim=""))


# An account's increments; a customer's notice flags too (a system account's stay as they are: NULL).
_UPDATE_ACCOUNT = accounts.update().where(accounts.c.id == sa.bindparam("b_id")).values(
    debits_pending=accounts.c.debits_pending + sa.bindparam("dp"),
    debits_posted=accounts.c.debits_posted + sa.bindparam("dpo"),
    credits_pending=accounts.c.credits_pending + sa.bindparam("cp"),
    credits_posted=accounts.c.credits_posted + sa.bindparam("cpo"),
    low_notified=sa.func.coalesce(sa.bindparam("low", type_=sa.Boolean), accounts.c.low_notified),
    zero_notified=sa.func.coalesce(sa.bindparam("zero", type_=sa.Boolean), accounts.c.zero_notified))


# Row readers take a mapping: an SQLAlchemy row's _mapping or an asyncpg Record.

def _account(row) -> domain.Account:
    return domain.Account(id=row["id"], kind=row["kind"], email=row["email"], debits_pending=row["debits_pending"],
                          debits_posted=row["debits_posted"], credits_pending=row["credits_pending"],
                          credits_posted=row["credits_posted"], low_notified=bool(row["low_notified"]),
                          zero_notified=bool(row["zero_notified"]))


def _units(row) -> domain.Units:
    return domain.Units(int(row["input_tokens"] or 0), int(row["output_tokens"] or 0), int(row["images"] or 0),
                        int(row["video_ms"] or 0), int(row["characters"] or 0), int(row["audio_ms"] or 0))


def _hold(row) -> domain.Hold:
    settlement = None
    if row["outcome"] is not None:
        settlement = domain.Settlement(hold_id=row["id"], units=_units(row), outcome=row["outcome"],
                                       request_id=row["settled_request_id"], ended_ms=row["ended_ms"])
    return domain.Hold(id=row["id"], account_id=row["account_id"], key_id=row["key_id"], model=row["model"],
                       request_id=row["request_id"], prices=_decode_prices(row["prices"]),
                       price_version=row["price_version"], amount_nanos=row["amount_nanos"],
                       created_ms=row["created_ms"], expires_ms=row["expires_ms"], status=row["status"],
                       settlement=settlement, cost_nanos=row["cost_nanos"], settled_ms=row["settled_ms"])


@functools.lru_cache(maxsize=256)
def _decode_prices(header: str) -> Mapping[str, int]:
    # Few distinct snapshots exist (one per price version), and the Book never mutates them.
    return types.MappingProxyType(pricing.decode_header(header))


def _hold_row(hold: domain.Hold) -> dict:
    return {"id": hold.id, "account_id": hold.account_id, "key_id": hold.key_id, "model": hold.model,
            "request_id": hold.request_id, "prices": hold.prices_header or pricing.encode_header(hold.prices),
            "price_version": hold.price_version, "amount_nanos": hold.amount_nanos, "status": hold.status,
            "created_ms": hold.created_ms, "expires_ms": hold.expires_ms}


def _hold_update(hold: domain.Hold) -> dict:
    s = hold.settlement
    units = s.units if s else _NO_UNITS
    return {"b_id": hold.id, "b_status": hold.status, "b_outcome": s.outcome if s else None,
            "b_request_id": s.request_id if s else "", "b_ended_ms": s.ended_ms if s else 0,
            "b_cost_nanos": hold.cost_nanos, "b_settled_ms": hold.settled_ms,
            "b_input_tokens": units.input_tokens, "b_output_tokens": units.output_tokens, "b_images": units.images,
            "b_video_ms": units.video_ms, "b_characters": units.characters, "b_audio_ms": units.audio_ms}


_NO_UNITS = domain.Units()


def _notice_row(n: domain.Notice) -> dict:
    return {"account_id": n.account_id, "to_addr": n.email, "kind": n.kind, "balance_nanos": n.balance_nanos,
            "created_ms": n.created_ms, "next_attempt_ms": n.created_ms}


def _account_delta(book: domain.Book, account_id: str) -> dict:
    """An account's increments; customers (locked, read in full) also carry their notice flags."""
    dp, dpo, cp, cpo = book.deltas[account_id]
    account = book.accounts[account_id]
    customer = account.kind == domain.CUSTOMER
    return {"b_id": account_id, "dp": dp, "dpo": dpo, "cp": cp, "cpo": cpo,
            "low": account.low_notified if customer else None, "zero": account.zero_notified if customer else None}


def _transfer_row(t: domain.Transfer) -> dict:
    return {"id": t.id, "kind": t.kind, "debit_account_id": t.debit_account_id,
            "credit_account_id": t.credit_account_id, "amount_nanos": t.amount_nanos, "pending_id": t.pending_id,
            "reason": t.reason, "created_ms": t.created_ms}


def _usage_row(row: domain.UsageRow) -> dict:
    u = row.units
    return {"account_id": row.account_id, "hold_id": row.hold_id, "request_id": row.request_id,
            "key_id": row.key_id, "model": row.model, "created_ms": row.created_ms, "day": row.day,
            "input_tokens": u.input_tokens, "output_tokens": u.output_tokens, "images": u.images,
            "video_ms": u.video_ms, "characters": u.characters, "audio_ms": u.audio_ms,
            "cost_nanos": row.cost_nanos, "outcome": row.outcome}


def _usage(row) -> domain.UsageRow:
    return domain.UsageRow(account_id=row["account_id"], hold_id=row["hold_id"], request_id=row["request_id"],
                           key_id=row["key_id"], model=row["model"], created_ms=row["created_ms"],
                           units=_units(row), cost_nanos=row["cost_nanos"], outcome=row["outcome"])


def _lago_row(row: domain.UsageRow) -> dict:
    properties = {"model": row.model, "outcome": row.outcome, **row.units.as_usage()}
    return {"transaction_id": row.request_id or row.hold_id, "account_id": row.account_id,
            "event_ms": row.created_ms, "cost_nanos": row.cost_nanos, "properties": json.dumps(properties),
            "created_ms": row.created_ms, "next_attempt_ms": 0}


# --- reconciliation queries (ledger_svc.reconcile says what they are checked for) ---

RECONCILE_PAGE = 1000
_TRANSFER_FIELDS = ("id", "kind", "debit_account_id", "credit_account_id", "amount_nanos", "pending_id", "reason",
                    "created_ms")
_USAGE_FIELDS = ("account_id", "hold_id", "request_id", "key_id", "model", "created_ms", *domain.UNIT_FIELDS,
                 "cost_nanos", "outcome")
# Each of a hold's transfers, by the id the ledger derives from the hold's.
_CALL_TRANSFERS = tuple((kind, transfers.alias(f"t_{kind}")) for kind in (domain.HOLD, domain.POST, domain.VOID,
                                                                        domain.EXPIRE))


def _calls_select() -> sa.Select:
    joined = holds
    columns = [holds]
    for kind, alias in _CALL_TRANSFERS:
        joined = joined.outerjoin(alias, alias.c.id == sa.literal(kind + ":") + holds.c.id)
        columns += [alias.c[name].label(f"t_{kind}_{name}") for name in _TRANSFER_FIELDS]
    joined = joined.outerjoin(usage, usage.c.hold_id == holds.c.id)
    columns += [usage.c[name].label(f"u_{name}") for name in _USAGE_FIELDS]
    since = sa.bindparam("since", type_=sa.BigInteger)
    return (sa.select(*columns).select_from(joined)
            .where(sa.or_(holds.c.created_ms >= since, holds.c.settled_ms >= since))
            .order_by(holds.c.id))


def _stray_transfers_select() -> sa.Select:
    # The hold a transfer belongs to is in its id ("post:<hold id>"); the expression is on the
    # transfers side, so each row finds its hold through the primary key.
    hold_id = sa.case((transfers.c.kind == domain.EXPIRE, sa.func.substr(transfers.c.id, len("expire:") + 1)),
                      else_=sa.func.substr(transfers.c.id, len("hold:") + 1))
    return (sa.select(transfers).select_from(transfers.outerjoin(holds, holds.c.id == hold_id))
            .where(transfers.c.kind.in_((domain.HOLD, domain.POST, domain.VOID, domain.EXPIRE)),
                   transfers.c.created_ms >= sa.bindparam("since", type_=sa.BigInteger),
                   sa.or_(holds.c.id.is_(None), sa.not_(transfers.c.id.like(transfers.c.kind.concat(":%"))))))


def _account_totals_select() -> sa.Select:
    posted = transfers.c.kind.in_((domain.GRANT, domain.PAYMENT, domain.ADJUSTMENT, domain.POST))
    zero = sa.literal(0, sa.BigInteger)
    moves = sa.union_all(
        sa.select(transfers.c.debit_account_id.label("account_id"), transfers.c.amount_nanos.label("debits"),
                  zero.label("credits")).where(posted),
        sa.select(transfers.c.credit_account_id, zero, transfers.c.amount_nanos).where(posted)).subquery("moves")
    sums = (sa.select(moves.c.account_id, sa.func.sum(moves.c.debits).label("debits"),
                      sa.func.sum(moves.c.credits).label("credits")).group_by(moves.c.account_id).subquery("sums"))
    held = (sa.select(holds.c.account_id, sa.func.sum(holds.c.amount_nanos).label("held"))
            .where(holds.c.status == domain.PENDING).group_by(holds.c.account_id).subquery("held"))
    return (sa.select(accounts, sa.func.coalesce(sums.c.debits, 0).label("journal_debits"),
                      sa.func.coalesce(sums.c.credits, 0).label("journal_credits"),
                      sa.func.coalesce(held.c.held, 0).label("journal_held"))
            .select_from(accounts.outerjoin(sums, sums.c.account_id == accounts.c.id)
                         .outerjoin(held, held.c.account_id == accounts.c.id))
            .order_by(accounts.c.id))


def _payments_select() -> sa.Select:
    intent_id = sa.func.substr(transfers.c.id, len(reconcile.STRIPE_PREFIX) + 1)
    return (sa.select(transfers, billing_topups.c.id.label("topup_id"), billing_topups.c.status.label("topup_status"),
                      billing_topups.c.amount_nanos.label("topup_amount"),
                      billing_topups.c.account_id.label("topup_account"))
            .select_from(transfers.outerjoin(billing_topups, billing_topups.c.payment_intent_id == intent_id))
            .where(transfers.c.kind == domain.PAYMENT,
                   transfers.c.created_ms >= sa.bindparam("since", type_=sa.BigInteger))
            .order_by(transfers.c.id))


def _uncredited_topups_select() -> sa.Select:
    since = sa.bindparam("since", type_=sa.BigInteger)
    credit = sa.literal(reconcile.STRIPE_PREFIX) + billing_topups.c.payment_intent_id
    return (sa.select(billing_topups).select_from(billing_topups.outerjoin(transfers, transfers.c.id == credit))
            .where(billing_topups.c.status == "succeeded", transfers.c.id.is_(None),
                   sa.or_(billing_topups.c.created_ms >= since, billing_topups.c.credited_ms >= since)))


def _lago_transaction_id(table) -> sa.ColumnElement:
    """_lago_row's transaction id in SQL: the request id, else the hold id."""
    return sa.case((table.c.request_id != "", table.c.request_id), else_=table.c.hold_id)


_EXPORT_FIELDS = ("id", "transaction_id", "account_id", "cost_nanos", "status", "attempts", "last_error")


def _settled_calls_select() -> sa.Select:
    # The outbox is counted per transaction id first, so that a transaction id many calls share
    # (a bug upstream) costs a row per call, not a row per pair.
    per_id = (sa.select(lago_outbox.c.transaction_id, sa.func.count().label("count"),
                        sa.func.min(lago_outbox.c.id).label("first_id"))
              .group_by(lago_outbox.c.transaction_id).subquery("per_id"))
    return (sa.select(usage, per_id.c.count.label("o_count"),
                      *(lago_outbox.c[name].label(f"o_{name}") for name in _EXPORT_FIELDS))
            .select_from(usage.outerjoin(per_id, per_id.c.transaction_id == _lago_transaction_id(usage))
                         .outerjoin(lago_outbox, lago_outbox.c.id == per_id.c.first_id))
            .where(usage.c.outcome != domain.FAILED, usage.c.created_ms >= sa.bindparam("since", type_=sa.BigInteger))
            .order_by(usage.c.id))


def _stray_exports_select() -> sa.Select:
    # Two equality joins rather than one with OR: each can use an index (SQLite builds one for
    # the request ids on the fly) where an OR would scan the usage rows once per event. The
    # request ids are distinct first, so that one many calls share matches an event once.
    by_request = (sa.select(usage.c.request_id).distinct()
                  .where(usage.c.request_id != "", usage.c.outcome != domain.FAILED).subquery("by_request"))
    by_hold = usage.alias("by_hold")
    joined = (lago_outbox
              .outerjoin(by_request, by_request.c.request_id == lago_outbox.c.transaction_id)
              .outerjoin(by_hold, sa.and_(by_hold.c.hold_id == lago_outbox.c.transaction_id,
                                          by_hold.c.request_id == "", by_hold.c.outcome != domain.FAILED)))
    return (sa.select(*(lago_outbox.c[name] for name in _EXPORT_FIELDS)).select_from(joined)
            .where(lago_outbox.c.created_ms >= sa.bindparam("since", type_=sa.BigInteger),
                   by_request.c.request_id.is_(None), by_hold.c.id.is_(None)))


_CALLS = _calls_select()
_STRAY_TRANSFERS = _stray_transfers_select()
_STRAY_USAGE = (sa.select(usage).select_from(usage.outerjoin(holds, holds.c.id == usage.c.hold_id))
                .where(holds.c.id.is_(None), usage.c.created_ms >= sa.bindparam("since", type_=sa.BigInteger)))
_ACCOUNT_TOTALS = _account_totals_select()
_PAYMENTS = _payments_select()
_UNCREDITED_TOPUPS = _uncredited_topups_select()
_SETTLED_CALLS = _settled_calls_select()
_STRAY_EXPORTS = _stray_exports_select()


def _transfer(row, prefix: str = "") -> domain.Transfer:
    return domain.Transfer(**{name: row[prefix + name] for name in _TRANSFER_FIELDS})


def _call_row(row) -> reconcile.CallRow:
    found = {kind: _transfer(row, f"t_{kind}_") if row[f"t_{kind}_id"] is not None else None
             for kind, _alias in _CALL_TRANSFERS}
    used = None
    if row["u_hold_id"] is not None:
        used = _usage({name: row[f"u_{name}"] for name in _USAGE_FIELDS})
    return reconcile.CallRow(hold=_hold(row), hold_transfer=found[domain.HOLD], post=found[domain.POST],
                             void=found[domain.VOID], expire=found[domain.EXPIRE], usage=used)


def _account_row(row) -> reconcile.AccountRow:
    return reconcile.AccountRow(account=_account(row), journal_debits_nanos=int(row["journal_debits"]),
                                journal_credits_nanos=int(row["journal_credits"]),
                                held_nanos=int(row["journal_held"]))


def _export(row, prefix: str) -> reconcile.Export:
    return reconcile.Export(**{name: row[prefix + name] for name in _EXPORT_FIELDS})


def system_account_rows(now_ms: int) -> list[dict]:
    """The system accounts every journal starts with (the migration inserts them)."""
    return [{"id": account_id, "kind": domain.SYSTEM, "created_ms": now_ms} for account_id in domain.SYSTEM_ACCOUNTS]


def _decide(book: domain.Book, ops: Sequence, now: int) -> list:
    """Every operation of a batch, in arrival order, against one Book."""
    results = []
    for op in ops:
        if type(op) is _HoldOp:
            results.append(book.hold(op.request, now))
        elif type(op) is _SettleOp:
            results.append([book.settle(s, now) for s in op.settlements])
        else:
            results.append(sum(book.expire(hold_id, now) for hold_id in op.hold_ids))
    book.assert_balanced()
    return results


# Each section of the write statement takes its rows as one JSON array of objects:
# encoding a JSON string is one C call, where asyncpg checks every array element.
_HOLD_INSERT = ("id", "account_id", "key_id", "model", "request_id", "prices", "price_version", "amount_nanos",
                "status", "created_ms", "expires_ms")
_TRANSFER_INSERT = ("id", "kind", "debit_account_id", "credit_account_id", "amount_nanos", "pending_id", "reason",
                    "created_ms")
_USAGE_INSERT = ("account_id", "hold_id", "request_id", "key_id", "model", "created_ms", "day", *domain.UNIT_FIELDS,
                 "cost_nanos", "outcome")
_EMAIL_INSERT = ("account_id", "to_addr", "kind", "balance_nanos", "created_ms", "next_attempt_ms")
_LAGO_INSERT = ("transaction_id", "account_id", "event_ms", "cost_nanos", "properties", "created_ms",
                "next_attempt_ms")


def _json_insert(table: sa.Table, names: Sequence[str], param: int) -> str:
    columns = ", ".join(names)
    return (f"INSERT INTO {table.name} ({columns}) SELECT {columns} "
            f"FROM json_populate_recordset(NULL::{table.name}, ${param}::json)")


def _pg_write() -> str:
    sections = [f"new_holds AS ({_json_insert(holds, _HOLD_INSERT, 1)})"]
    sets = ", ".join([f"{name} = u.b_{name}" for name in ("status", "outcome", *domain.UNIT_FIELDS, "ended_ms",
                                                          "cost_nanos", "settled_ms")]
                     + ["settled_request_id = u.b_request_id"])
    record = ", ".join(["b_id varchar", "b_status varchar", "b_outcome varchar", "b_request_id varchar",
                        *(f"b_{name} bigint"
                          for name in (*domain.UNIT_FIELDS, "ended_ms", "cost_nanos", "settled_ms"))])
    sections.append(f"settled AS (UPDATE {holds.name} h SET {sets} FROM json_to_recordset($2::json) "
                    f"AS u({record}) WHERE h.id = u.b_id)")
    for index, (name, table, columns) in enumerate((
            ("new_transfers", transfers, _TRANSFER_INSERT), ("new_usage", usage, _USAGE_INSERT),
            ("new_emails", email_outbox, _EMAIL_INSERT), ("new_lago", lago_outbox, _LAGO_INSERT)), start=3):
        sections.append(f"{name} AS ({_json_insert(table, columns, index)})")
    # The customer rows are already locked (FOR UPDATE); the one system row a batch moves
    # (revenue) is locked here, at the very end of the transaction.
    sections.append(
        f"moved AS (UPDATE {accounts.name} a SET debits_pending = a.debits_pending + u.dp, "
        "debits_posted = a.debits_posted + u.dpo, credits_pending = a.credits_pending + u.cp, "
        "credits_posted = a.credits_posted + u.cpo, low_notified = coalesce(u.low, a.low_notified), "
        "zero_notified = coalesce(u.zero, a.zero_notified) FROM json_to_recordset($7::json) "
        "AS u(b_id varchar, dp bigint, dpo bigint, cp bigint, cpo bigint, low boolean, zero boolean) "
        "WHERE a.id = u.b_id)")
    return "WITH " + ",\n".join(sections) + "\nSELECT 1"


_PG_WRITE = _pg_write()
# NO KEY UPDATE: as exclusive as FOR UPDATE for our writes, but a foreign-key check of another
# transaction (a transfer naming the account) does not wait for it.
_PG_LOCK_HOLDS = f"SELECT * FROM {holds.name} WHERE id = ANY($1::varchar[]) ORDER BY id FOR NO KEY UPDATE"
_PG_LOCK_ACCOUNTS = f"SELECT * FROM {accounts.name} WHERE id = ANY($1::varchar[]) ORDER BY id FOR NO KEY UPDATE"


# SQLite: the same statements, one executemany each on the sqlite3 connection.

def _fetch(lite, sql: str, *params) -> list[dict]:
    cursor = lite.execute(sql, params)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _tuples(rows: list[dict], names: Sequence[str]) -> list[tuple]:
    if len(names) == 1:
        return [(row[names[0]],) for row in rows]
    return list(map(operator.itemgetter(*names), rows))  # the fields picked in C, in order


def _lite_insert(table: sa.Table, names: Sequence[str]) -> str:
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"


_LITE_HOLDS = f"SELECT * FROM {holds.name} WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
_LITE_ACCOUNTS = f"SELECT * FROM {accounts.name} WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
_LITE_INSERT_HOLDS = _lite_insert(holds, _HOLD_INSERT)
_LITE_INSERT_TRANSFERS = _lite_insert(transfers, _TRANSFER_INSERT)
_LITE_INSERT_USAGE = _lite_insert(usage, _USAGE_INSERT)
_LITE_INSERT_EMAILS = _lite_insert(email_outbox, _EMAIL_INSERT)
_LITE_INSERT_LAGO = _lite_insert(lago_outbox, _LAGO_INSERT)
_LITE_HOLD_UPDATE = ("b_status", "b_outcome", *(f"b_{name}" for name in domain.UNIT_FIELDS), "b_request_id",
                     "b_ended_ms", "b_cost_nanos", "b_settled_ms", "b_id")
_LITE_UPDATE_HOLDS = (f"UPDATE {holds.name} SET status = ?, outcome = ?, "
                      + "".join(f"{name} = ?, " for name in domain.UNIT_FIELDS)
                      + "settled_request_id = ?, ended_ms = ?, cost_nanos = ?, settled_ms = ? WHERE id = ?")
_LITE_ACCOUNT_UPDATE = ("dp", "dpo", "cp", "cpo", "low", "zero", "b_id")
_LITE_UPDATE_ACCOUNTS = (f"UPDATE {accounts.name} SET debits_pending = debits_pending + ?, "
                         "debits_posted = debits_posted + ?, credits_pending = credits_pending + ?, "
                         "credits_posted = credits_posted + ?, low_notified = coalesce(?, low_notified), "
                         "zero_notified = coalesce(?, zero_notified) WHERE id = ?")
# Each statement with the row fields it binds, in _batch_rows' order.
_LITE_WRITES = ((_LITE_INSERT_HOLDS, _HOLD_INSERT), (_LITE_UPDATE_HOLDS, _LITE_HOLD_UPDATE),
                (_LITE_INSERT_TRANSFERS, _TRANSFER_INSERT), (_LITE_INSERT_USAGE, _USAGE_INSERT),
                (_LITE_INSERT_EMAILS, _EMAIL_INSERT), (_LITE_INSERT_LAGO, _LAGO_INSERT),
                (_LITE_UPDATE_ACCOUNTS, _LITE_ACCOUNT_UPDATE))
