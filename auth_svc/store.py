"""auth_svc's SQL: accounts, API keys, sessions, email verifications and upgrade requests."""
import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)
metadata = sa.MetaData()
# PostgreSQL channel on which a replica tells the others that keys changed.
KEYS_CHANGED = "tokens_auth_keys_changed"

accounts = sa.Table(
    "accounts", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    # As typed (mail goes there); email_key is what makes an address unique.
    sa.Column("email", sa.String(254), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(200), nullable=False),
    # pending until ledger_svc has opened the credit account, then active.
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # domain.email_key under the plus-tag rule in force when the row was written (rows that
    # collided when the column was added carry "#<account id>": see their migration).
    sa.Column("email_key", sa.String(300), nullable=False, unique=True),
    # When the owner followed the verification link (NULL: not yet: the keys cannot spend).
    sa.Column("email_verified_at", sa.BigInteger, nullable=True),
    # When ledger_svc was given the verified address for its notices (NULL: not yet).
    sa.Column("ledger_email_at", sa.BigInteger, nullable=True),
)

email_verifications = sa.Table(
    "email_verifications", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("account_id", sa.String(32), sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False,
              index=True),
    # The address the link was mailed to: it verifies that address only.
    sa.Column("email", sa.String(254), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
)

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("account_id", sa.String(32), sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("display", sa.String(32), nullable=False),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    sa.Column("last_used", sa.BigInteger, nullable=True),
)

sessions = sa.Table(
    "sessions", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("account_id", sa.String(32), sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
)

upgrade_requests = sa.Table(
    "upgrade_requests", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("account_id", sa.String(32), sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(1000), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("decided_at", sa.BigInteger, nullable=True),
    # When the customer's approval email was queued (with ledger_svc); NULL: not yet.
    sa.Column("notified_at", sa.BigInteger, nullable=True),
)


@dataclasses.dataclass(frozen=True)
class AccountRow:
    """The accounts table's columns, in its order."""
    id: str
    email: str
    password_hash: str
    status: str
    created_at: int
    email_key: str = ""
    email_verified_at: int | None = None
    ledger_email_at: int | None = None

    @property
    def verified(self) -> bool:
        return self.email_verified_at is not None


@dataclasses.dataclass(frozen=True)
class KeyRow:
    id: str
    account_id: str
    name: str
    display: str
    tier: str
    created_at: int
    revoked_at: int | None
    last_used: int | None


@dataclasses.dataclass(frozen=True)
class Credential:
    """What the hot path needs to admit a call made with a key or a session."""
    account_id: str
    key_id: str
    tier: str
    stored_hash: str
    # The account's email is verified (its keys may spend).
    verified: bool = False


@dataclasses.dataclass(frozen=True)
class UpgradeRow:
    id: str
    account_id: str
    email: str
    tier: str
    reason: str
    status: str
    created_at: int
    decided_at: int | None


class DuplicateEmail(Exception):
    pass


class AuthStore(Protocol):
    async def create_pending_account(self, account: AccountRow) -> None: ...
    async def account_by_email(self, email: str) -> AccountRow | None: ...
    async def account_by_id(self, account_id: str) -> AccountRow | None: ...
    async def activate(self, account_id: str, key: KeyRow, secret_hash: str) -> None: ...
    async def key_credential(self, secret_hash: str) -> Credential | None: ...
    async def session_credential(self, token_hash: str, now: int) -> Credential | None: ...


_KEY_COLUMNS = (api_keys.c.id, api_keys.c.account_id, api_keys.c.name, api_keys.c.display, api_keys.c.tier,
                api_keys.c.created_at, api_keys.c.revoked_at, api_keys.c.last_used)


def _key(row) -> KeyRow:
    return KeyRow(*row)


class CredentialCache:
    """Admitted keys, so the hot path rarely touches SQL.

    Exact on one replica: every write that can change an answer (revoke, tier,
    activation) clears it in the same process. Across PostgreSQL replicas each
    such write also NOTIFYs KEYS_CHANGED in its transaction and every replica
    clears on receipt (milliseconds); while a replica has no listening
    connection it does not cache at all. `ttl_s` bounds staleness in any case.
    """

    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.enabled = ttl_s > 0
        self._entries: dict[str, tuple[Credential, float]] = {}

    def get(self, secret_hash: str) -> Credential | None:
        entry = self._entries.get(secret_hash)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._entries[secret_hash]
            return None
        return entry[0]

    def put(self, secret_hash: str, credential: Credential) -> None:
        if not self.enabled:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[secret_hash] = (credential, time.monotonic() + self.ttl_s)

    def clear(self) -> None:
        self._entries.clear()


class SqlAuthStore:
    def __init__(self, engine: AsyncEngine, cache_ttl_s: float = 30.0) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self.cache = CredentialCache(cache_ttl_s)
        # Replicas on PostgreSQL cache only while they hear each other's changes.
        if self.postgres:
            self.cache.enabled = False
        self._listener = None
        self._key_lookup = (
            sa.select(api_keys.c.account_id, api_keys.c.id, api_keys.c.tier, api_keys.c.secret_hash,
                      accounts.c.email_verified_at.is_not(None))
            .join(accounts, accounts.c.id == api_keys.c.account_id)
            .where(api_keys.c.secret_hash == sa.bindparam("h"), api_keys.c.revoked_at.is_(None),
                   accounts.c.status == "active"))
        self._session_lookup = (
            sa.select(sessions.c.account_id, sessions.c.token_hash, accounts.c.email_verified_at.is_not(None))
            .join(accounts, accounts.c.id == sessions.c.account_id)
            .where(sessions.c.token_hash == sa.bindparam("h"), sessions.c.expires_at > sa.bindparam("now"),
                   accounts.c.status == "active"))

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def _changing_keys(self):
        """A write transaction that can change a credential: other replicas are
        told at commit, and this one forgets its cache after the commit."""
        async with self.engine.begin() as conn:
            yield conn
            if self.postgres:
                await conn.execute(sa.select(sa.func.pg_notify(KEYS_CHANGED, "")))
        self.cache.clear()

    def listen(self) -> None:
        """On PostgreSQL, follow other replicas' key changes (and only then cache)."""
        if self.postgres and self.cache.ttl_s > 0:
            self._listener = asyncio.create_task(self._listen_forever())

    async def _listen_forever(self) -> None:
        import asyncpg

        dsn = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(dsn, timeout=5)
                await connection.add_listener(KEYS_CHANGED, lambda *_: self.cache.clear())
                self.cache.clear()
                self.cache.enabled = True
                while not connection.is_closed():
                    await asyncio.sleep(1)
                    await connection.execute("SELECT 1", timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("key-change listener lost; not caching keys", extra={"error": str(error)})
            finally:
                self.cache.enabled = False
                self.cache.clear()
                if connection is not None and not connection.is_closed():
                    await connection.close()
            await asyncio.sleep(1)

    # Accounts

    async def create_pending_account(self, account: AccountRow) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(accounts.insert().values(**dataclasses.asdict(account)))
        except IntegrityError:
            raise DuplicateEmail(account.email) from None

    async def account_by_email(self, email: str, key: str = "") -> AccountRow | None:
        """The account of exactly `email`, else the one whose email_key is `key`. Exact first:
        accounts whose addresses collided before keys existed keep logging in with theirs."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(accounts).where(accounts.c.email == email))).first()
            if row is None and key:
                row = (await conn.execute(sa.select(accounts).where(accounts.c.email_key == key))).first()
        return AccountRow(*row) if row else None

    async def account_by_id(self, account_id: str) -> AccountRow | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(accounts).where(accounts.c.id == account_id))).first()
        return AccountRow(*row) if row else None

    async def pending_accounts(self, older_than: int, limit: int = 100) -> list[AccountRow]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(accounts).where(
                accounts.c.status == "pending", accounts.c.created_at < older_than).limit(limit))
            return [AccountRow(*r) for r in rows]

    async def activate(self, account_id: str, key: KeyRow | None, secret_hash: str) -> bool:
        """Marks a pending account active and adds its first key, in one transaction.
        Returns False when it was not pending (someone else finished it)."""
        async with self._changing_keys() as conn:
            done = await conn.execute(accounts.update().where(
                accounts.c.id == account_id, accounts.c.status == "pending").values(status="active"))
            if done.rowcount != 1:
                return False
            if key is not None:
                await conn.execute(api_keys.insert().values(secret_hash=secret_hash, **dataclasses.asdict(key)))
        return True

    # Keys

    async def add_key(self, key: KeyRow, secret_hash: str, revoked_since: int,
                      keys_max: Callable[[list[str]], int]) -> int | None:
        """Adds a key unless the account already holds `keys_max(tiers of its counted keys)` keys
        that count: live ones, and ones revoked at `revoked_since` or later. None when added,
        else that maximum. Parallel calls for one account take turns (the account row is
        locked on PostgreSQL; SQLite writes one transaction at a time)."""
        async with self.engine.begin() as conn:
            await conn.execute(sa.select(accounts.c.id).where(accounts.c.id == key.account_id).with_for_update())
            counted = (await conn.execute(sa.select(api_keys.c.tier).where(
                api_keys.c.account_id == key.account_id,
                sa.or_(api_keys.c.revoked_at.is_(None), api_keys.c.revoked_at >= revoked_since)))).scalars().all()
            most = keys_max([*counted, key.tier])
            if len(counted) >= most:
                return most
            await conn.execute(api_keys.insert().values(secret_hash=secret_hash, **dataclasses.asdict(key)))
        return None

    async def list_keys(self, account_id: str, include_revoked: bool) -> list[KeyRow]:
        query = sa.select(*_KEY_COLUMNS).where(api_keys.c.account_id == account_id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        async with self.engine.connect() as conn:
            rows = await conn.execute(query.order_by(api_keys.c.created_at, api_keys.c.id).limit(1000))
            return [_key(r) for r in rows]

    async def get_key(self, key_id: str) -> KeyRow | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(*_KEY_COLUMNS).where(api_keys.c.id == key_id))).first()
        return _key(row) if row else None

    async def revoke_key(self, key_id: str, now: int) -> KeyRow | None:
        async with self._changing_keys() as conn:
            await conn.execute(api_keys.update().where(
                api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)).values(revoked_at=now))
            row = (await conn.execute(sa.select(*_KEY_COLUMNS).where(api_keys.c.id == key_id))).first()
        return _key(row) if row else None

    async def set_key_tier(self, key_id: str, tier: str) -> KeyRow | None:
        async with self._changing_keys() as conn:
            await conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(tier=tier))
            row = (await conn.execute(sa.select(*_KEY_COLUMNS).where(api_keys.c.id == key_id))).first()
        return _key(row) if row else None

    async def set_account_tier(self, account_id: str, tier: str, lower_tiers: list[str] | None) -> list[KeyRow]:
        """Sets `tier` on every key of the account (only on keys whose tier is in
        `lower_tiers` when given), live and revoked alike so nothing lags behind."""
        update = api_keys.update().where(api_keys.c.account_id == account_id)
        if lower_tiers is not None:
            update = update.where(api_keys.c.tier.in_(lower_tiers))
        async with self._changing_keys() as conn:
            await conn.execute(update.values(tier=tier))
            rows = await conn.execute(sa.select(*_KEY_COLUMNS).where(api_keys.c.account_id == account_id)
                                      .order_by(api_keys.c.created_at).limit(1000))
            return [_key(r) for r in rows]

    async def touch_keys(self, last_used: dict[str, int]) -> None:
        if not last_used:
            return
        async with self.engine.begin() as conn:
            await conn.execute(api_keys.update().where(api_keys.c.id == sa.bindparam("kid"))
                               .values(last_used=sa.bindparam("ts")),
                               [{"kid": k, "ts": t} for k, t in last_used.items()])

    # The hot path

    async def key_credential(self, secret_hash: str) -> Credential | None:
        cached = self.cache.get(secret_hash)
        if cached is not None:
            return cached
        async with self.engine.connect() as conn:
            row = (await conn.execute(self._key_lookup, {"h": secret_hash})).first()
        if row is None:
            return None
        credential = Credential(row[0], row[1], row[2], row[3], bool(row[4]))
        self.cache.put(secret_hash, credential)
        return credential

    async def session_credential(self, token_hash: str, now: int) -> Credential | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(self._session_lookup, {"h": token_hash, "now": now})).first()
        return Credential(account_id=row[0], key_id="", tier="", stored_hash=row[1], verified=bool(row[2])) \
            if row else None

    # Email verification

    async def add_verification(self, token_hash: str, account: AccountRow, now: int, expires_at: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(email_verifications.delete().where(email_verifications.c.account_id == account.id,
                                                                  email_verifications.c.expires_at < now))
            await conn.execute(email_verifications.insert().values(
                token_hash=token_hash, account_id=account.id, email=account.email, created_at=now,
                expires_at=expires_at))

    async def verify_token(self, token_hash: str, now: int) -> AccountRow | None:
        """Marks verified the address a live token was mailed to, if it is still the account's;
        the account's tokens are spent. None for an unknown, expired or stale token."""
        async with self._changing_keys() as conn:
            row = (await conn.execute(
                sa.select(email_verifications.c.account_id).join(
                    accounts, sa.and_(accounts.c.id == email_verifications.c.account_id,
                                      accounts.c.email == email_verifications.c.email))
                .where(email_verifications.c.token_hash == token_hash,
                       email_verifications.c.expires_at > now))).first()
            if row is None:
                return None
            await self._mark_verified(conn, row[0], now)
            await conn.execute(email_verifications.delete().where(email_verifications.c.account_id == row[0]))
        return await self.account_by_id(row[0])

    async def mark_verified(self, account_id: str, now: int) -> AccountRow | None:
        async with self._changing_keys() as conn:
            await self._mark_verified(conn, account_id, now)
        return await self.account_by_id(account_id)

    async def _mark_verified(self, conn, account_id: str, now: int) -> None:
        await conn.execute(accounts.update().where(accounts.c.id == account_id,
                                                   accounts.c.email_verified_at.is_(None))
                           .values(email_verified_at=now))

    async def mark_ledger_email(self, account_id: str, now: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(accounts.update().where(accounts.c.id == account_id).values(ledger_email_at=now))

    async def unsynced_emails(self, verified_before: int, limit: int = 100) -> list[AccountRow]:
        """Active, verified accounts whose address ledger_svc has not been given yet."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(accounts).where(
                accounts.c.status == "active", accounts.c.email_verified_at < verified_before,
                accounts.c.ledger_email_at.is_(None)).limit(limit))
            return [AccountRow(*r) for r in rows]

    # Sessions

    async def add_session(self, token_hash: str, account_id: str, now: int, expires_at: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(sessions.delete().where(sessions.c.expires_at < now))
            await conn.execute(sessions.insert().values(token_hash=token_hash, account_id=account_id,
                                                        created_at=now, expires_at=expires_at))

    async def delete_session(self, token_hash: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(sessions.delete().where(sessions.c.token_hash == token_hash))

    # Upgrade requests

    async def add_upgrade_request(self, row: UpgradeRow) -> UpgradeRow:
        """One pending request per account: a second ask returns the first."""
        async with self.engine.begin() as conn:
            existing = (await conn.execute(sa.select(upgrade_requests).where(
                upgrade_requests.c.account_id == row.account_id,
                upgrade_requests.c.status == "pending"))).first()
            if existing is None:
                values = {k: v for k, v in dataclasses.asdict(row).items() if k != "email"}
                await conn.execute(upgrade_requests.insert().values(**values))
        if existing is not None:
            return UpgradeRow(existing.id, existing.account_id, row.email, existing.tier, existing.reason,
                              existing.status, existing.created_at, existing.decided_at)
        return row

    async def list_upgrade_requests(self, status: str, limit: int, account_id: str = "",
                                    request_id: str = "") -> list[UpgradeRow]:
        query = _UPGRADES
        if request_id:
            query = query.where(upgrade_requests.c.id == request_id)
        if status != "all":
            query = query.where(upgrade_requests.c.status == status)
        if account_id:
            query = query.where(upgrade_requests.c.account_id == account_id)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query.order_by(upgrade_requests.c.created_at.desc()).limit(limit))
            return [_upgrade_row(r) for r in rows]

    async def unnotified_upgrades(self, older_than: int, limit: int = 100) -> list[UpgradeRow]:
        """Approved requests decided before `older_than` whose email is not queued yet."""
        query = (_UPGRADES.where(upgrade_requests.c.status == "approved", upgrade_requests.c.notified_at.is_(None),
                                 upgrade_requests.c.decided_at < older_than)
                 .order_by(upgrade_requests.c.decided_at).limit(limit))
        async with self.engine.connect() as conn:
            return [_upgrade_row(r) for r in await conn.execute(query)]

    async def mark_upgrade_notified(self, request_id: str, now: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(upgrade_requests.update().where(upgrade_requests.c.id == request_id)
                               .values(notified_at=now))

    async def decide_upgrade_request(self, request_id: str, status: str, now: int) -> UpgradeRow | None:
        async with self.engine.begin() as conn:
            await conn.execute(upgrade_requests.update().where(
                upgrade_requests.c.id == request_id, upgrade_requests.c.status == "pending")
                .values(status=status, decided_at=now))
        rows = await self.list_upgrade_requests("all", 1, request_id=request_id)
        return rows[0] if rows else None


def now_s() -> int:
    return int(time.time())


# Upgrade requests with their account's email.
_UPGRADES = sa.select(upgrade_requests, accounts.c.email).join(accounts, accounts.c.id == upgrade_requests.c.account_id)


def _upgrade_row(r) -> UpgradeRow:
    return UpgradeRow(r.id, r.account_id, r.email, r.tier, r.reason, r.status, r.created_at, r.decided_at)
