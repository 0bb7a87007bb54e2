"""auth_svc's gRPC face: the Accounts API, operators' AuthAdmin, and Envoy's
first ext_authz filter, which turns an API key or a session into trusted
x-ts-* headers for every service behind it.

Abuse it defends against, with ratelimit_svc keeping the counts (ClientLimits):
signups per client address, failed logins per email and per address (checked
before the password is, so a right password is refused too while they are over),
verification mails per account and address; argon2 on a bounded pool
(passwords.py); a tier's maximum of live keys, revoked keys counting for a window;
keys of an unverified address cannot spend.
"""
import asyncio
import dataclasses
import functools
import logging
import time

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from auth_svc import domain, passwords, store as store_mod
from auth_svc.config import Settings
from common import authz, clients, db, errors, grpcserver, logs, migrate
from ratelimit_svc import limits, tiers as tier_table
from tokens.auth.v1 import auth_pb2, auth_pb2_grpc
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tokens.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (auth_pb2.DESCRIPTOR.services_by_name["Accounts"].full_name,
                 auth_pb2.DESCRIPTOR.services_by_name["AuthAdmin"].full_name,
                 "envoy.service.auth.v3.Authorization")
# The trusted headers this filter sets. Every other x-ts-* header a client
# sends is removed, so every x-ts-* header behind Envoy comes from a filter.
H_AUTH, H_ACCOUNT, H_KEY, H_TIER = "x-ts-auth", "x-ts-account", "x-ts-key", "x-ts-tier"
H_SESSION = "x-ts-session-hash"
# The client's address as Envoy decided it (devtool/envoy_config.py's XFF rule); Envoy sets
# it on every external call and removes any copy a client sends.
H_CLIENT_ADDRESS = "x-envoy-external-address"
SESSION_COOKIE = "ts_session"
# Route policy from Envoy (devtool/envoy_config.py): which credentials a route takes, and
# whether the account's email must be verified (calls that spend money or add cards).
POLICY, VERIFIED = "auth", "verified"
# The mailed link opens the dashboard, which posts the token: the fragment never reaches a
# server's access log, and a mail scanner that follows links verifies nothing.
VERIFY_PATH = "/dashboard/verify#"
# Methods that change nothing. Any other call made with the session cookie must carry a
# content type a cross-site form cannot send (JSON, or gRPC): a browser lets another site
# send those only after a CORS preflight, which this API never grants. The cookie is also
# SameSite=Strict; this is the second lock.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSRF_SAFE_TYPES = ("application/json", "application/grpc")


def identity(context: grpc.aio.ServicerContext) -> tuple[str, str, str]:
    """(auth kind, account id, key id) from the headers auth's filter set."""
    kind = account = key = ""
    for name, value in context.invocation_metadata() or ():
        if name == H_AUTH:
            kind = value
        elif name == H_ACCOUNT:
            account = value
        elif name == H_KEY:
            key = value
    if kind not in ("key", "session") or not account:
        raise errors.Unauthenticated("this method needs an API key or a dashboard session")
    return kind, account, key


def client_address(context: grpc.aio.ServicerContext) -> str:
    """The caller's address as Envoy's trusted header says; calls that did not come through
    Envoy's public listener (operators, tests) share one bucket."""
    for name, value in context.invocation_metadata() or ():
        if name == H_CLIENT_ADDRESS and value:
            return value[:64]
    return "unknown"


def _key_message(row: store_mod.KeyRow) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(id=row.id, name=row.name, display=row.display, tier=row.tier,
                           created=row.created_at, revoked=row.revoked_at is not None,
                           revoked_at=row.revoked_at or 0, last_used=row.last_used or 0,
                           account_id=row.account_id)


def _bearer(headers) -> str:
    value = headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return ""


def _cookie(headers, name: str) -> str:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


class Auth:
    """Shared state of the three servicers: store, ledger and ratelimit clients, password pool."""

    def __init__(self, settings: Settings, store: store_mod.SqlAuthStore, ledger: ledger_pb2_grpc.LedgerStub,
                 limiter: ratelimit_pb2_grpc.ClientLimitsStub, clock=time.time) -> None:
        self.settings = settings
        self.store = store
        self.ledger = ledger
        self.limiter = limiter
        self.clock = clock
        self.passwords = passwords.Passwords(time_cost=settings.argon2_time_cost,
                                             memory_kib=settings.argon2_memory_kib,
                                             workers=settings.argon2_workers, queue_max=settings.argon2_queue_max,
                                             wait_max_s=settings.argon2_wait_max_s)
        self.last_used: dict[str, int] = {}

    def now(self) -> int:
        return int(self.clock())

    def ledger_call(self) -> dict:
        """Options of every call to ledger_svc: its timeout, the internal credential and this
        call's request id, and a wait while ledger_svc (re)connects within that timeout."""
        return {"timeout": self.settings.ledger_timeout_s, "wait_for_ready": True,
                "metadata": clients.metadata(logs.request_id.get())}

    async def hash_password(self, password: str) -> str:
        return await self.passwords.hash(password)

    async def password_ok(self, stored: str | None, password: str) -> bool:
        return await self.passwords.matches(stored, password)

    def email_key(self, email: str) -> str:
        return domain.email_key(email, self.settings.email_plus_tags)

    async def take(self, context, hits: list[tuple[limits.ClientLimit, str]]) -> list[ratelimit_pb2.Receipt]:
        """Counts `hits` with ratelimit_svc, all or none; refused: a 429 with Retry-After that says
        which limit. ratelimit_svc unreachable: a 503 (never an unlimited call)."""
        request = ratelimit_pb2.TakeRequest(hits=[ratelimit_pb2.ClientHit(limit=limit.name, subject=subject)
                                                  for limit, subject in hits])
        try:
            taken = await self.limiter.Take(request, **self.ratelimit_call())
        except grpc.aio.AioRpcError as error:
            log.warning("ratelimit_svc did not answer", extra={"grpc": error.code().name})
            raise errors.Unavailable("this cannot be done right now; try again in a moment") from None
        if taken.allowed:
            return list(taken.receipts)
        refused = limits.BY_NAME.get(taken.refused_by)
        seconds = max(taken.retry_after_s, 1)
        raise errors.RateLimited(_too_many(refused, seconds), retry_after_s=seconds)

    async def release(self, receipts: list[ratelimit_pb2.Receipt]) -> None:
        """Takes counted hits back; if ratelimit_svc cannot, they keep counting (the safe side)."""
        if not receipts:
            return
        try:
            await self.limiter.Release(ratelimit_pb2.ReleaseRequest(receipts=receipts), **self.ratelimit_call())
        except grpc.aio.AioRpcError as error:
            log.warning("hits not released", extra={"grpc": error.code().name})

    def ratelimit_call(self) -> dict:
        return {"timeout": self.settings.ratelimit_timeout_s, "wait_for_ready": True,
                "metadata": clients.metadata(logs.request_id.get())}

    async def open_ledger_account(self, account: store_mod.AccountRow) -> ledger_pb2.Balance:
        """Opens the credit account; the ledger gets the address only once it is verified, so
        that no notice is ever mailed to an address nobody proved they own."""
        email = account.email if account.verified else ""
        try:
            return await self.ledger.OpenAccount(
                ledger_pb2.OpenAccountRequest(account_id=account.id, email=email), **self.ledger_call())
        except grpc.aio.AioRpcError as error:
            log.warning("ledger could not open the account", extra={"account": account.id,
                                                                    "grpc": error.code().name})
            raise errors.Unavailable("signup could not be completed right now; try again in a moment "
                                     "with the same email and password") from None

    async def balance(self, account_id: str) -> ledger_pb2.Balance:
        try:
            return await self.ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id=account_id),
                                                **self.ledger_call())
        except grpc.aio.AioRpcError:
            raise errors.Unavailable("the balance is unavailable right now; try again in a moment") from None

    async def send_verification(self, account: store_mod.AccountRow) -> bool:
        """A fresh link to the account's address through ledger_svc's email outbox (older links
        keep working until they expire). False when the ledger could not queue it."""
        token = domain.new_secret(domain.VERIFY_PREFIX)
        token_hash = domain.secret_hash(token)
        now = self.now()
        await self.store.add_verification(token_hash, account, now, now + self.settings.verify_ttl_s)
        link = f"{self.settings.public_base_url}{VERIFY_PATH}{token}"
        email = ledger_pb2.QueueEmailRequest(account_id=account.id, kind="verify_email", to=account.email,
                                             dedupe_key=f"verify:{token_hash[:40]}",
                                             details={"link": link, "hours": str(self.settings.verify_ttl_s // 3600)})
        try:
            await self.ledger.QueueEmail(email, **self.ledger_call())
        except grpc.aio.AioRpcError as error:
            log.warning("verification email not queued", extra={"account": account.id, "grpc": error.code().name})
            return False
        log.info("verification email queued", extra={"account": account.id})
        return True

    async def verified(self, account: store_mod.AccountRow) -> None:
        """After verification: the ledger gets the address for its notices (retried by the
        reconciler if the ledger cannot take it now)."""
        try:
            await self.ledger.OpenAccount(ledger_pb2.OpenAccountRequest(account_id=account.id, email=account.email),
                                          **self.ledger_call())
        except grpc.aio.AioRpcError as error:
            log.warning("ledger not told the verified address yet", extra={"account": account.id,
                                                                           "grpc": error.code().name})
            return
        await self.store.mark_ledger_email(account.id, self.now())

    def new_key(self, account_id: str, name: str, tier: str) -> tuple[str, store_mod.KeyRow]:
        secret = domain.new_secret(domain.KEY_PREFIX)
        row = store_mod.KeyRow(id=domain.new_id("key_"), account_id=account_id, name=name,
                               display=domain.display(secret), tier=tier, created_at=self.now(),
                               revoked_at=None, last_used=None)
        return secret, row

    async def account_tier(self, account_id: str) -> str:
        """The highest tier among the account's live keys."""
        keys = await self.store.list_keys(account_id, include_revoked=False)
        return domain.highest_tier(k.tier for k in keys)

    async def notify_upgrade(self, row: store_mod.UpgradeRow) -> bool:
        """Emails the customer that an approved upgrade is in force, through ledger_svc's email
        outbox (auth_svc has no mail of its own). The dedupe key makes a retry after a lost
        answer a no-op; the row remembers it was done."""
        email = ledger_pb2.QueueEmailRequest(account_id=row.account_id, kind="tier_changed",
                                             dedupe_key=f"upgrade:{row.id}",
                                             details={"tier": await self.account_tier(row.account_id)})
        try:
            await self.ledger.QueueEmail(email, **self.ledger_call())
        except grpc.aio.AioRpcError as error:
            log.warning("upgrade email not queued yet", extra={"upgrade": row.id, "grpc": error.code().name})
            return False
        await self.store.mark_upgrade_notified(row.id, self.now())
        return True

    async def account_message(self, account: store_mod.AccountRow) -> auth_pb2.Account:
        balance = await self.balance(account.id)
        tier = await self.account_tier(account.id)
        return auth_pb2.Account(id=account.id, email=account.email, created=account.created_at,
                                balance_usd=balance.balance_usd, available_usd=balance.available_usd,
                                held_usd=balance.held_usd, status=account.status, tier=tier,
                                email_verified=account.verified)

    async def finish_signup(self, account: store_mod.AccountRow) -> tuple[str, store_mod.KeyRow] | None:
        """Opens the credit account, then activates the account with its first key.
        None when someone else (the reconciler, a retry) activated it first."""
        await self.open_ledger_account(account)
        secret, key = self.new_key(account.id, "default", domain.DEFAULT_TIER)
        if await self.store.activate(account.id, key, domain.secret_hash(secret)):
            return secret, key
        return None

    async def reconcile(self) -> None:
        """Finishes signups left pending by a ledger outage or a crash, and queues the emails
        of approved upgrades the ledger could not take at the time."""
        for account in await self.store.pending_accounts(older_than=self.now() - 10):
            try:
                await self.open_ledger_account(account)
            except errors.Unavailable:
                return
            await self.store.activate(account.id, None, "")
            log.info("finished a pending signup", extra={"account": account.id})
        for row in await self.store.unnotified_upgrades(older_than=self.now() - 10):
            if not await self.notify_upgrade(row):
                return
        for account in await self.store.unsynced_emails(verified_before=self.now() - 10):
            await self.verified(account)

    async def flush_last_used(self) -> None:
        pending, self.last_used = self.last_used, {}
        await self.store.touch_keys(pending)


def _says_when_to_retry(method):
    """An error that knows when to retry (429 over a limit, 503 while the password pool is full)
    also reaches HTTP callers as a Retry-After header."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except errors.ApiError as error:
            if error.retry_after_s is not None:
                await context.send_initial_metadata((("retry-after", str(error.retry_after_s)),))
            raise
    return wrapper


class AccountsServicer(auth_pb2_grpc.AccountsServicer):
    def __init__(self, auth: Auth) -> None:
        self.a = auth

    @_says_when_to_retry
    async def CreateAccount(self, request, context):
        email = domain.normalize_email(request.email)
        domain.check_password(request.password, email, self.a.settings.min_password_chars)
        key = self.a.email_key(email)
        existing = await self.a.store.account_by_email(email, key)
        if existing is not None:
            resumable = existing.status == "pending" and await self.a.password_ok(existing.password_hash,
                                                                                  request.password)
            if not resumable:
                raise _EMAIL_TAKEN
            account = existing
        else:
            # Counted before any work: a refused signup creates nothing and hashes nothing.
            receipts = await self.a.take(context, [(limits.SIGNUPS_PER_ADDRESS, client_address(context))])
            account = store_mod.AccountRow(id=domain.new_id("acct_"), email=email,
                                           password_hash=await self.a.hash_password(request.password),
                                           status="pending", created_at=self.a.now(), email_key=key)
            try:
                await self.a.store.create_pending_account(account)
            except store_mod.DuplicateEmail:
                await self.a.release(receipts)
                raise _EMAIL_TAKEN from None
        finished = await self.a.finish_signup(account)
        if finished is None:
            raise errors.Conflict("this signup was already completed; log in instead", param="email",
                                  code="email_taken")
        secret, key_row = finished
        account = dataclasses.replace(account, password_hash="", status="active")
        await self.a.send_verification(account)
        log.info("signup", extra={"account": account.id})
        return auth_pb2.CreateAccountResponse(account=await self.a.account_message(account), api_key=secret,
                                              key=_key_message(key_row))

    @_says_when_to_retry
    async def CreateSession(self, request, context):
        self.a.passwords.check_room()
        email = (request.email or "").strip()[:domain.MAX_EMAIL_CHARS]
        account = None
        key = email.lower()
        if email and "@" in email:
            try:
                email = domain.normalize_email(email)
            except errors.InvalidRequest:
                pass
            else:
                key = self.a.email_key(email)
                account = await self.a.store.account_by_email(email, key)
        # Counted as a failure before the password is checked (taken back if it was right), so
        # that parallel guesses cannot overrun the limit and an attacker learns nothing while
        # it is full: the right password is refused too until the window frees.
        receipts = await self.a.take(context, [(limits.LOGIN_FAILURES_PER_EMAIL, key or "(none)"),
                                               (limits.LOGIN_FAILURES_PER_ADDRESS, client_address(context))])
        ok = await self.a.password_ok(account.password_hash if account else None, request.password or "")
        if not ok or account is None or account.status != "active":
            raise errors.Unauthenticated("incorrect email or password", code="invalid_credentials")
        await self.a.release(receipts)
        token = domain.new_secret(domain.SESSION_PREFIX)
        now = self.a.now()
        expires = now + self.a.settings.session_ttl_s
        await self.a.store.add_session(domain.secret_hash(token), account.id, now, expires)
        await context.send_initial_metadata((
            ("set-cookie", f"{SESSION_COOKIE}={token}; Path=/; Max-Age={self.a.settings.session_ttl_s}; "
                           "HttpOnly; SameSite=Strict"),))
        return auth_pb2.CreateSessionResponse(session_token=token, expires=expires,
                                              account=await self.a.account_message(account))

    async def VerifyEmail(self, request, context):
        token = (request.token or "").strip()
        if not domain.well_formed(token, domain.VERIFY_PREFIX):
            raise _BAD_LINK
        account = await self.a.store.verify_token(domain.secret_hash(token), self.a.now())
        if account is None:
            raise _BAD_LINK
        log.info("email verified", extra={"account": account.id})
        await self.a.verified(account)
        return auth_pb2.VerifyEmailResponse(email=account.email, email_verified=True)

    @_says_when_to_retry
    async def ResendVerification(self, request, context):
        _kind, account_id, _key = identity(context)
        account = await self.a.store.account_by_id(account_id)
        if account is None:
            raise errors.NotFound("account not found")
        if account.verified:
            raise errors.InvalidRequest(f"{account.email} is already verified", code="already_verified")
        await self.a.take(context, [(limits.VERIFY_MAILS_PER_ACCOUNT, account.id),
                                    (limits.VERIFY_MAILS_PER_ADDRESS, client_address(context))])
        if not await self.a.send_verification(account):
            raise errors.Unavailable("the email could not be sent right now; try again in a moment")
        return auth_pb2.ResendVerificationResponse(sent_to=account.email)

    async def DeleteSession(self, request, context):
        kind, _account, _key = identity(context)
        if kind == "session":
            metadata = dict(context.invocation_metadata())
            token = metadata.get(H_SESSION, "")
            if token:
                await self.a.store.delete_session(token)
        await context.send_initial_metadata((
            ("set-cookie", f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"),))
        return auth_pb2.DeleteSessionResponse()

    async def GetAccount(self, request, context):
        _kind, account_id, _key = identity(context)
        account = await self.a.store.account_by_id(account_id)
        if account is None:
            raise errors.NotFound("account not found")
        return await self.a.account_message(account)

    async def CreateKey(self, request, context):
        _kind, account_id, _key = identity(context)
        name = domain.check_key_name(request.name)
        # A new key starts at the account's current tier, so a Paid account's keys stay Paid.
        tier = await self.a.account_tier(account_id)
        secret, key = self.a.new_key(account_id, name, tier)
        # A key revoked within the window still counts: its calls there still count too, so no
        # sequence of creations and revocations admits more than keys_max x the tier's limit.
        most = await self.a.store.add_key(key, domain.secret_hash(secret),
                                          self.a.now() - tier_table.REVOKED_COUNTS_S,
                                          lambda names: domain.keys_max(domain.highest_tier(names)))
        if most is not None:
            raise errors.InvalidRequest(
                f"Your tier allows at most {most} API keys at once, and a key revoked in the last minute still "
                "counts; revoke one and wait a minute, or ask for a higher tier.", code="too_many_keys")
        return auth_pb2.CreateKeyResponse(key=_key_message(key), secret=secret)

    async def ListKeys(self, request, context):
        _kind, account_id, _key = identity(context)
        rows = await self.a.store.list_keys(account_id, include_revoked=request.include_revoked)
        return auth_pb2.ListKeysResponse(object="list", data=[_key_message(r) for r in rows])

    async def RevokeKey(self, request, context):
        _kind, account_id, _key = identity(context)
        row = await self.a.store.get_key(request.key_id)
        if row is None or row.account_id != account_id:
            raise errors.NotFound(f"no key {errors.echo(request.key_id)!r} on this account", param="key_id")
        revoked = await self.a.store.revoke_key(row.id, self.a.now())
        log.info("key revoked", extra={"key": row.id, "account": account_id})
        return _key_message(revoked)

    async def CreateUpgradeRequest(self, request, context):
        _kind, account_id, _key = identity(context)
        tier = domain.check_tier(request.tier or "elevated")
        if tier != "elevated":
            raise errors.InvalidRequest("only the elevated tier can be requested; paid follows a top-up",
                                        param="tier", code="invalid_tier")
        reason = (request.reason or "").strip()
        if len(reason) > 1000:
            raise errors.InvalidRequest("reason must be at most 1000 characters", param="reason")
        current = await self.a.account_tier(account_id)
        if domain.TIER_RANK[current] >= domain.TIER_RANK[tier]:
            raise errors.InvalidRequest(f"your keys are already on the {current} tier", param="tier",
                                        code="already_upgraded")
        account = await self.a.store.account_by_id(account_id)
        row = store_mod.UpgradeRow(id=domain.new_id("upg_"), account_id=account_id, email=account.email,
                                   tier=tier, reason=reason, status="pending", created_at=self.a.now(),
                                   decided_at=None)
        return _upgrade_message(await self.a.store.add_upgrade_request(row))

    async def ListMyUpgradeRequests(self, request, context):
        _kind, account_id, _key = identity(context)
        rows = await self.a.store.list_upgrade_requests("all", min(max(request.limit or 20, 1), 100),
                                                        account_id=account_id)
        return auth_pb2.ListUpgradeRequestsResponse(data=[_upgrade_message(r) for r in rows])


_EMAIL_TAKEN = errors.Conflict("an account with this email already exists; log in instead", param="email",
                               code="email_taken")
_BAD_LINK = errors.InvalidRequest("This verification link is not valid: it may have expired, or a newer one was "
                                  "used. Log in to the dashboard to send a new one.", param="token",
                                  code="invalid_verification_link")


def _too_many(limit: limits.ClientLimit | None, retry_after_s: int) -> str:
    seconds = "1 second" if retry_after_s == 1 else f"{retry_after_s} seconds"
    whose = {"client address": "from your address", "email": "for this email", "account": "for this account"}
    if limit is None:
        return f"Too many requests. Retry after {seconds}."
    also = " Until then the right password is refused too." if limit.counts == "failed logins" else ""
    return (f"Too many {limit.counts} {whose.get(limit.per, '')} in {limits.describe_window(limit.window_s)}. "
            f"Retry after {seconds}.{also}")


def _upgrade_message(row: store_mod.UpgradeRow) -> auth_pb2.UpgradeRequest:
    return auth_pb2.UpgradeRequest(id=row.id, account_id=row.account_id, email=row.email, tier=row.tier,
                                   reason=row.reason, status=row.status, created=row.created_at,
                                   decided=row.decided_at or 0)


class AuthAdminServicer(auth_pb2_grpc.AuthAdminServicer):
    def __init__(self, auth: Auth) -> None:
        self.a = auth

    async def _find(self, query: str) -> store_mod.AccountRow:
        query = query.strip()
        account = None
        if query.startswith("key_"):
            key = await self.a.store.get_key(query)
            account = await self.a.store.account_by_id(key.account_id) if key else None
        elif "@" in query:
            email = domain.normalize_email(query)
            account = await self.a.store.account_by_email(email, self.a.email_key(email))
        elif query:
            account = await self.a.store.account_by_id(query)
        if account is None:
            raise errors.NotFound(f"no account matches {query!r}")
        return account

    async def LookupAccount(self, request, context):
        account = await self._find(request.query)
        keys = await self.a.store.list_keys(account.id, include_revoked=True)
        try:
            message = await self.a.account_message(account)
        except errors.Unavailable:
            message = auth_pb2.Account(id=account.id, email=account.email, created=account.created_at,
                                       status=account.status, balance_usd="unavailable",
                                       email_verified=account.verified)
        return auth_pb2.LookupAccountResponse(account=message, keys=[_key_message(k) for k in keys])

    async def SetKeyTier(self, request, context):
        row = await self.a.store.set_key_tier(request.key_id, domain.check_tier(request.tier))
        if row is None:
            raise errors.NotFound(f"no key {request.key_id!r}", param="key_id")
        log.info("key tier set", extra={"key": row.id, "tier": row.tier})
        return _key_message(row)

    async def SetAccountTier(self, request, context):
        tier = domain.check_tier(request.tier)
        if await self.a.store.account_by_id(request.account_id) is None:
            raise errors.NotFound(f"no account {request.account_id!r}", param="account_id")
        lower = domain.tiers_below(tier) if request.only_upgrade else None
        rows = await self.a.store.set_account_tier(request.account_id, tier, lower)
        return auth_pb2.SetAccountTierResponse(keys=[_key_message(r) for r in rows])

    async def RevokeKey(self, request, context):
        row = await self.a.store.revoke_key(request.key_id, self.a.now())
        if row is None:
            raise errors.NotFound(f"no key {request.key_id!r}", param="key_id")
        return _key_message(row)

    async def ListUpgradeRequests(self, request, context):
        status = request.status or "pending"
        if status not in ("pending", "approved", "rejected", "all"):
            raise errors.InvalidRequest("status must be pending, approved, rejected or all", param="status")
        rows = await self.a.store.list_upgrade_requests(status, min(max(request.limit or 100, 1), 1000))
        return auth_pb2.ListUpgradeRequestsResponse(data=[_upgrade_message(r) for r in rows])

    async def VerifyEmail(self, request, context):
        account = await self._find(request.query)
        verified = await self.a.store.mark_verified(account.id, self.a.now())
        log.info("email verified by an operator", extra={"account": account.id})
        await self.a.verified(verified)
        try:
            return await self.a.account_message(verified)
        except errors.Unavailable:
            return auth_pb2.Account(id=verified.id, email=verified.email, status=verified.status,
                                    email_verified=verified.verified, balance_usd="unavailable")

    async def DecideUpgradeRequest(self, request, context):
        rows = await self.a.store.list_upgrade_requests("all", 1, request_id=request.id)
        if not rows:
            raise errors.NotFound(f"no upgrade request {request.id!r}")
        if rows[0].status != "pending":
            raise errors.InvalidRequest(f"upgrade request {request.id} is already {rows[0].status}")
        status = "approved" if request.approve else "rejected"
        if request.approve:
            await self.a.store.set_account_tier(rows[0].account_id, rows[0].tier, domain.tiers_below(rows[0].tier))
        decided = await self.a.store.decide_upgrade_request(request.id, status, self.a.now())
        if request.approve:
            # Retried by the reconciler until the ledger has it queued.
            await self.a.notify_upgrade(decided)
        return _upgrade_message(decided)


_MISSING = errors.Unauthenticated(
    "You didn't provide an API key. Send it as a bearer token (Authorization: Bearer YOUR_KEY); "
    "create keys in the dashboard.", code=None)
_SESSION_ON_API = errors.Unauthenticated(
    "Dashboard sessions cannot call this endpoint; use an API key (Authorization: Bearer YOUR_KEY).",
    code="invalid_api_key")


_CROSS_SITE = errors.PermissionDenied(
    "A call that changes something with the dashboard's session cookie must send Content-Type: "
    "application/json (this protects your account from other sites' forms).", code="csrf_check_failed")


def _csrf_safe(method: str, headers) -> bool:
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    return method.upper() in SAFE_METHODS or media_type.startswith(CSRF_SAFE_TYPES)


def _incorrect(secret: str) -> errors.Unauthenticated:
    shown = secret[:8] + "..." + secret[-4:] if len(secret) > 16 else "(too short)"
    return errors.Unauthenticated(f"Incorrect API key provided: {shown}. Check the key, or create a new one "
                                  "in the dashboard.", code="invalid_api_key")


_SESSION_ONLY = errors.PermissionDenied(
    "API keys call the API; keys, cards and top-ups are managed by a person logged in to the dashboard "
    "(a session). Log in at /dashboard to do this.", code="session_required")


def _not_verified(base_url: str) -> errors.PermissionDenied:
    return errors.PermissionDenied(
        "Verify your email address to use this: follow the link we emailed you at signup, or send a new one "
        f"from the dashboard ({base_url}/dashboard) or with POST /v1/email-verifications/resend.",
        code="email_not_verified")


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Envoy's first ext_authz filter. Route policy arrives as context extensions:
    "auth" is public, key (API key only), any (key or session), session (a
    dashboard session only: people manage keys and money, programs spend), or
    optional (a key is checked if given, else the call is anonymous); "verified"
    is "required" where the account's email must be verified (spending, cards)."""

    def __init__(self, auth: Auth) -> None:
        self.a = auth
        self._not_verified = _not_verified(auth.settings.public_base_url)

    async def Check(self, request, context):
        http = request.attributes.request.http
        headers = http.headers
        client_ts = [name for name in headers if name.startswith("x-ts-")]
        extensions = request.attributes.context_extensions
        policy = extensions.get(POLICY, "key")
        if policy == "public":
            return _allow(((H_AUTH, "none"),), client_ts)
        secret = _bearer(headers)
        if not secret and policy in ("any", "session"):
            secret = _cookie(headers, SESSION_COOKIE)
            if secret and not _csrf_safe(http.method, headers):
                return authz.deny(_CROSS_SITE, http)
        if not secret:
            if policy == "optional":
                return _allow(((H_AUTH, "none"),), client_ts)
            return authz.deny(_MISSING, http)
        needs_verified = extensions.get(VERIFIED) == "required"
        if secret.startswith(domain.SESSION_PREFIX):
            if policy not in ("any", "optional", "session"):
                return authz.deny(_SESSION_ON_API, http)
            return await self._session(secret, http, client_ts, needs_verified)
        if not domain.well_formed(secret, domain.KEY_PREFIX):
            return authz.deny(_incorrect(secret), http)
        presented = domain.secret_hash(secret)
        credential = await self.a.store.key_credential(presented)
        if credential is None or not domain.same_hash(credential.stored_hash, presented):
            return authz.deny(_incorrect(secret), http)
        if policy == "session":
            return authz.deny(_SESSION_ONLY, http)
        if needs_verified and not credential.verified:
            return authz.deny(self._not_verified, http)
        self.a.last_used[credential.key_id] = self.a.now()
        return _allow(((H_AUTH, "key"), (H_ACCOUNT, credential.account_id), (H_KEY, credential.key_id),
                       (H_TIER, credential.tier)), client_ts)

    async def _session(self, token: str, http, client_ts: list[str], needs_verified: bool):
        if not domain.well_formed(token, domain.SESSION_PREFIX):
            return authz.deny(errors.Unauthenticated("invalid session; log in again", code="invalid_session"), http)
        presented = domain.secret_hash(token)
        credential = await self.a.store.session_credential(presented, self.a.now())
        if credential is None:
            return authz.deny(errors.Unauthenticated("session expired; log in again", code="invalid_session"), http)
        if needs_verified and not credential.verified:
            return authz.deny(self._not_verified, http)
        return _allow(((H_AUTH, "session"), (H_ACCOUNT, credential.account_id), (H_SESSION, presented)),
                      client_ts)


@functools.lru_cache(maxsize=10_000)
def _allow_answer(trusted: tuple[tuple[str, str], ...]):
    """The answer for a call that brought no x-ts-* header of its own (Envoy strips them, so
    all of them): built once per set of trusted headers (a key's, a session's), not per call."""
    return authz.allow([authz.header(n, v) for n, v in trusted])


def _allow(trusted: tuple[tuple[str, str], ...], client_ts: list[str]):
    """Sets the trusted headers and removes every other x-ts-* the client sent."""
    if not client_ts:
        return _allow_answer(trusted)
    names = {name for name, _ in trusted}
    return authz.allow([authz.header(n, v) for n, v in trusted],
                       remove=[n for n in client_ts if n not in names])


def build_server(settings: Settings, store: store_mod.SqlAuthStore, ledger: ledger_pb2_grpc.LedgerStub,
                 limiter: ratelimit_pb2_grpc.ClientLimitsStub, clock=time.time):
    """(server, port, health, auth): not started; the caller starts it."""
    auth = Auth(settings, store, ledger, limiter, clock)
    server, health = grpcserver.create(SERVICE_NAMES)
    auth_pb2_grpc.add_AccountsServicer_to_server(AccountsServicer(auth), server)
    auth_pb2_grpc.add_AuthAdminServicer_to_server(AuthAdminServicer(auth), server)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(auth), server)
    port = grpcserver.bind(server, settings.server.host, settings.server.port, settings.server.tls)
    return server, port, health, auth


async def _every(seconds: float, job) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception:
            log.exception("background job failed", extra={"job": job.__name__})


async def main(settings: Settings) -> None:
    logs.setup("auth_svc", settings.server.log_level)
    engine = db.make_engine(settings.database_url, schema=settings.database_schema or None)
    await migrate.check("auth_svc", engine)
    store = store_mod.SqlAuthStore(engine, settings.key_cache_ttl_s)
    store.listen()
    channel = clients.channel(settings.ledger_addr, settings.server.tls)
    ratelimit_channel = clients.channel(settings.ratelimit_addr, settings.server.tls)
    server, port, health, auth = build_server(settings, store, ledger_pb2_grpc.LedgerStub(channel),
                                              ratelimit_pb2_grpc.ClientLimitsStub(ratelimit_channel))
    jobs = [asyncio.create_task(_every(settings.reconcile_every_s, auth.reconcile)),
            asyncio.create_task(_every(5.0, auth.flush_last_used))]
    log.info("auth_svc listening", extra={"port": port})

    async def on_stop():
        for job in jobs:
            job.cancel()
        await auth.flush_last_used()
        auth.passwords.close()
        await channel.close()
        await ratelimit_channel.close()
        await store.close()

    await grpcserver.run_until_signal(server, health, SERVICE_NAMES, settings.server,
                                      on_stop=on_stop)
