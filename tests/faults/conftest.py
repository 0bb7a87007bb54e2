"""Fault tests: the whole mesh behind the real Envoy, a bounded load of chat calls
(unary and streamed, several paid accounts and a few nearly empty ones), a fault
in the middle, then the books checked against what every client saw.

Everything here listens on 127.0.0.1. A load is at most LOAD_CLIENTS_MAX
concurrent clients for a few seconds, each call bounded by CALL_TIMEOUT_S.

What "the books" means (check_books):
- debits equal credits: GetJournalStats.sum_of_balances_nanos == 0;
- no hold is left pending once its expiry has passed;
- no call charged twice: usage rows have unique, non-empty request ids;
- no settled usage lost: every call the client saw complete has its usage row
  (outcome completed), with the units the client was shown and
  cost = units x price, the same cost the client was shown;
- no call ran free: every call the reference backend served has a usage row,
  except the calls a test names (a router crash: their holds expire);
- balance = signup grant + adjustments - sum of usage costs, nothing held,
  and no balance below minus one call's worst case;
- every error a client saw was a documented one (classify/assert_documented);
- and `./dev admin reconcile` exits 0: the journal against the usage rows, top-ups
  against Stripe (localstripe), the Lago export (off here). It runs again after each
  module (reconciled_after_module), so scenarios that do not check the books are
  reconciled too.
"""
import asyncio
import contextlib
import dataclasses
import fractions
import json
import os
import pathlib
import random
import signal
import sqlite3
import time
import uuid

import asyncpg
import httpx
import pytest
from tokens.auth.v1 import auth_pb2, auth_pb2_grpc
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from common import clients, db, money
from devtool import up
from tests.e2e.conftest import PASSWORD, mesh_config, reconcile, reconcile_after_module

LOAD_CLIENTS_MAX = 16
CALL_TIMEOUT_S = 20.0
ERROR_PAUSE_S = 0.2
MODEL = "ref-chat"
SIGNUP_GRANT_NANOS = 10 * money.NANOS_PER_USD
# Statuses a client may see, each with OpenAI's error shape (docs: "400, 401, 402, 404, 413, 429, 503").
DOCUMENTED = frozenset({400, 401, 402, 404, 413, 429, 503})
# The reference backend's per-token words are counted as the backend reports them;
# the ledger holds UTF-8 bytes + 8 per message + 8 of input and max_tokens of output.
TOKENS_PER_MESSAGE, TOKENS_PER_CALL = 8, 8


@pytest.fixture(scope="module", autouse=True)
def reconciled_after_module(request):
    yield from reconcile_after_module(request)


@contextlib.contextmanager
def running_mesh(tmp_path: pathlib.Path, *, env_of=None, timeout_s: float = 60.0, **overrides):
    mesh = up.Mesh(mesh_config(tmp_path, env_of=env_of or {}, **overrides))
    mesh.start(timeout_s=timeout_s)
    try:
        yield mesh
    finally:
        mesh.stop()


# --- the services' internal methods (straight to their ports, with the operator's certificate) ---

async def internal(mesh: up.Mesh, service: str, stub_class, method: str, request, *, extra=(), timeout_s=10.0):
    async with clients.channel(mesh.config.addresses(service), mesh.config.tls_files()) as channel:
        stub = stub_class(channel)
        return await getattr(stub, method)(request, timeout=timeout_s, metadata=tuple(extra))


async def journal(mesh: up.Mesh) -> ledger_pb2.GetJournalStatsResponse:
    return await internal(mesh, "ledger_svc", ledger_pb2_grpc.LedgerStub, "GetJournalStats",
                          ledger_pb2.GetJournalStatsRequest())


async def balance(mesh: up.Mesh, account_id: str) -> ledger_pb2.Balance:
    return await internal(mesh, "ledger_svc", ledger_pb2_grpc.LedgerStub, "GetBalance",
                          ledger_pb2.GetBalanceRequest(account_id=account_id))


async def prices_nanos(mesh: up.Mesh, model: str = MODEL) -> dict[str, int]:
    reply = await internal(mesh, "ledger_svc", ledger_pb2_grpc.LedgerStub, "GetPrices",
                           ledger_pb2.GetPricesRequest(models=[model]))
    (price,) = reply.prices
    return {unit: money.parse_usd(usd) for unit, usd in price.pricing.items()}


async def usage_rows(mesh: up.Mesh, account_id: str) -> list[ledger_pb2.UsageRecord]:
    rows, after = [], ""
    while True:
        page = await internal(mesh, "ledger_svc", ledger_pb2_grpc.UsageStub, "ListUsage",
                              ledger_pb2.ListUsageRequest(limit=1000, after=after),
                              extra=(("x-ts-account", account_id),))
        rows.extend(page.data)
        if not page.has_more:
            return rows
        after = page.next_after


async def backend_stats(mesh: up.Mesh) -> dict:
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(f"http://127.0.0.1:{mesh.config.backend_port}/_stats")).json()


async def ledger_holds(mesh: up.Mesh) -> list[dict]:
    """Every hold row, read from ledger_svc's own database (a test's view into the journal)."""
    url = mesh.config.database_url("ledger_svc")
    sql = ("SELECT id, account_id, request_id, amount_nanos, status, cost_nanos, created_ms, expires_ms "
           "FROM ledger_holds")
    if db.is_sqlite(url):
        path = url.split("///", 1)[1]
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(sql)]
    schema = mesh.config.database_schemas.get("ledger_svc")
    conn = await asyncpg.connect(url, server_settings={"search_path": schema} if schema else {})
    try:
        return [dict(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


# --- accounts ---

@dataclasses.dataclass
class Account:
    account_id: str
    api_key: str
    key_id: str
    small: bool = False
    # Credit this test added (negative: taken away) on top of the signup grant.
    adjust_nanos: int = 0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


async def open_account(mesh: up.Mesh, client: httpx.AsyncClient, *, tier: str = "paid",
                       available_nanos: int | None = None) -> Account:
    """A new account on `tier`; with `available_nanos`, its credit cut down to that."""
    email = f"faults-{uuid.uuid4().hex[:10]}@example.com"
    reply = await client.post(f"{mesh.config.base_url}/v1/accounts", json={"email": email, "password": PASSWORD})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    account = Account(body["account"]["id"], body["api_key"], body["key"]["id"])
    # As `./dev admin verify` does: the keys of an unverified address cannot spend.
    await internal(mesh, "auth_svc", auth_pb2_grpc.AuthAdminStub, "VerifyEmail",
                   auth_pb2.AdminVerifyEmailRequest(query=account.account_id))
    if tier != "free":
        await internal(mesh, "auth_svc", auth_pb2_grpc.AuthAdminStub, "SetAccountTier",
                       auth_pb2.SetAccountTierRequest(account_id=account.account_id, tier=tier))
    if available_nanos is not None:
        account.small = True
        account.adjust_nanos = available_nanos - SIGNUP_GRANT_NANOS
        await internal(mesh, "ledger_svc", ledger_pb2_grpc.LedgerStub, "Credit", ledger_pb2.CreditRequest(
            account_id=account.account_id, amount_nanos=account.adjust_nanos, kind="adjustment",
            transfer_id=f"faults:{uuid.uuid4()}", reason="fault test: a nearly empty account"))
    return account


async def open_accounts(mesh: up.Mesh, *, paid: int, small: int, small_nanos: int = 300_000) -> list[Account]:
    async with httpx.AsyncClient(timeout=30) as client:
        made = [await open_account(mesh, client) for _ in range(paid)]
        made += [await open_account(mesh, client, available_nanos=small_nanos) for _ in range(small)]
    return made


# --- the load ---

@dataclasses.dataclass(frozen=True)
class Shape:
    """What each client of a load sends: chat calls on MODEL, unary or streamed."""
    stream_share: float = 0.5
    unary_tokens: int = 8
    unary_delay_ms: int = 5
    stream_tokens: int = 16
    stream_delay_ms: int = 25
    max_tokens: int = 64
    # Each client's pause between two calls.
    pause_s: float = 0.05


@dataclasses.dataclass
class Call:
    account: Account
    stream: bool
    started: float
    content: str
    max_tokens: int
    ended: float = 0.0
    status: int | None = None
    request_id: str = ""
    headers: dict = dataclasses.field(default_factory=dict)
    error: dict | None = None
    raw_error: str = ""
    # Text chunks (streams) or the whole answer (unary) received.
    chunks: int = 0
    complete: bool = False
    usage: dict | None = None
    cut: str = ""

    @property
    def kind(self) -> str:
        """ok | http <status> <code> | stream error <code> | cut | transport <exception>."""
        if self.complete:
            return "ok"
        if self.status is None:
            return f"transport {self.cut}"
        if self.status != 200:
            code = (self.error or {}).get("error", {}).get("code")
            return f"http {self.status} {code}"
        if self.error is not None:
            return f"stream error {self.error.get('error', {}).get('code')}"
        return "cut"

    @property
    def got_output(self) -> bool:
        return self.status == 200 and (self.complete or self.chunks > 0)

    def worst_nanos(self, prices: dict[str, int]) -> int:
        units = {"input_tokens": len(self.content.encode()) + TOKENS_PER_MESSAGE + TOKENS_PER_CALL,
                 "output_tokens": self.max_tokens}
        return cost_nanos(prices, units)


def cost_nanos(prices: dict[str, int], units: dict[str, int]) -> int:
    """Units x price, computed here on its own (not common.pricing): exact, rounded half up once."""
    scale = {"input_per_million_tokens": ("input_tokens", 1_000_000),
             "output_per_million_tokens": ("output_tokens", 1_000_000)}
    exact = sum(fractions.Fraction(units.get(scale[unit][0], 0) * price, scale[unit][1])
                for unit, price in prices.items())
    return int(exact + fractions.Fraction(1, 2))


class Load:
    """`clients` concurrent callers, caller i on accounts[i % len(accounts)], until stop()."""

    def __init__(self, base_url: str, accounts: list[Account], *, clients: int = 12,
                 shape: Shape = Shape(), seed: int = 7) -> None:
        assert 0 < clients <= LOAD_CLIENTS_MAX
        self.base_url = base_url
        self.accounts = accounts
        self.clients = clients
        self.shape = shape
        self.calls: list[Call] = []
        self._random = random.Random(seed)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> "Load":
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=CALL_TIMEOUT_S, limits=limits)
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks), CALL_TIMEOUT_S + 5)
            self._tasks = []
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def in_flight_at(self, moment: float) -> list[Call]:
        return [c for c in self.calls if c.started <= moment < c.ended]

    async def _client(self, index: int) -> None:
        account = self.accounts[index % len(self.accounts)]
        while not self._stop.is_set():
            stream = self._random.random() < self.shape.stream_share
            call = await self.call(account, stream)
            # Like a real client, back off a little after an error (and stay far below the limits).
            pause = self.shape.pause_s if call.complete else max(self.shape.pause_s, ERROR_PAUSE_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause)

    async def call(self, account: Account, stream: bool) -> Call:
        s = self.shape
        tokens, delay = (s.stream_tokens, s.stream_delay_ms) if stream else (s.unary_tokens, s.unary_delay_ms)
        content = f"Hello [[tokens={tokens}]] [[delay_ms={delay}]]"
        call = Call(account=account, stream=stream, started=time.monotonic(), content=content,
                    max_tokens=s.max_tokens)
        self.calls.append(call)
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": s.max_tokens}
        try:
            if stream:
                await self._stream(call, {**body, "stream": True, "stream_options": {"include_usage": True}})
            else:
                await self._unary(call, body)
        except httpx.HTTPError as error:
            call.cut = type(error).__name__
        finally:
            call.ended = time.monotonic()
        return call

    def _answered(self, call: Call, reply: httpx.Response) -> None:
        call.status = reply.status_code
        call.request_id = reply.headers.get("x-request-id", "")
        call.headers = dict(reply.headers)

    async def _unary(self, call: Call, body: dict) -> None:
        reply = await self._http.post("/v1/chat/completions", json=body, headers=call.account.auth)
        self._answered(call, reply)
        if reply.status_code != 200:
            _read_error(call, reply.text)
            return
        answer = reply.json()
        call.usage = answer["usage"]
        call.chunks = 1
        call.complete = bool(answer["choices"][0]["message"]["content"])

    async def _stream(self, call: Call, body: dict) -> None:
        async with self._http.stream("POST", "/v1/chat/completions", json=body, headers=call.account.auth) as reply:
            self._answered(call, reply)
            if reply.status_code != 200:
                _read_error(call, (await reply.aread()).decode(errors="replace"))
                return
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    call.complete = call.usage is not None and call.error is None
                    continue
                event = json.loads(data)
                if "error" in event:
                    call.error = event
                    continue
                if event.get("usage"):
                    call.usage = event["usage"]
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        call.chunks += 1


def _read_error(call: Call, text: str) -> None:
    call.raw_error = text
    with contextlib.suppress(ValueError):
        call.error = json.loads(text)


def tally(calls: list[Call]) -> dict[str, int]:
    out: dict[str, int] = {}
    for call in calls:
        out[call.kind] = out.get(call.kind, 0) + 1
    return dict(sorted(out.items()))


def assert_documented(call: Call, also: frozenset[int] = frozenset()) -> None:
    """An error the client saw is a documented status with OpenAI's shape, or a stream cut."""
    if call.complete:
        return
    if call.status is None:
        raise AssertionError(f"the connection itself failed ({call.cut}); Envoy never went away")
    if call.status == 200:
        if call.error is not None:
            _assert_shape(call.error, call)
        return  # a stream that ended early: a cut
    assert call.status in DOCUMENTED | also, (call.status, call.raw_error)
    assert call.headers.get("content-type", "").startswith("application/json"), call.headers
    assert call.error is not None, call.raw_error
    _assert_shape(call.error, call)


def _assert_shape(body: dict, call: Call) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    expected = {"message", "type", "code"} if call.status == 402 else {"message", "type", "code", "param"}
    assert expected <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    if call.status == 402:
        assert error["type"] == "insufficient_quota" and error["code"] == "402", error


# --- waiting ---

async def wait_until(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        await asyncio.sleep(every_s)


async def envoy_sees(mesh: up.Mesh, cluster: str, statuses: list[str]) -> bool:
    try:
        hosts = await asyncio.to_thread(mesh.envoy_hosts)
    except OSError:
        return False
    return hosts.get(cluster) == statuses


async def restart(mesh: up.Mesh, service: str, replica: int = 0, timeout_s: float = 30.0) -> None:
    """Starts a stopped replica again and waits until it answers health checks and Envoy routes to it."""
    await asyncio.to_thread(mesh.start_service, service, replica)
    port = mesh.config.grpc_port(service, replica)

    async def healthy():
        proc = mesh.procs[f"{service}#{replica}"]
        assert proc.poll() is None, f"{service}#{replica} exited with {proc.returncode}"
        return await asyncio.to_thread(mesh.grpc_healthy, port)

    await wait_until(healthy, timeout_s, f"{service}#{replica} healthy")
    cluster = up.CLUSTER_OF[service]
    await wait_until(lambda: envoy_sees(mesh, cluster, ["healthy"] * mesh.config.count(service)), timeout_s,
                     f"Envoy routing to {service} again")


async def kill(mesh: up.Mesh, name: str) -> tuple[float, float]:
    """SIGKILL one process of the mesh; returns when (time.monotonic()) it was sent and when
    the process was gone."""
    sent = time.monotonic()
    await asyncio.to_thread(mesh.stop_one, name, signal.SIGKILL)
    return sent, time.monotonic()


# --- the books ---

@dataclasses.dataclass
class Books:
    calls: int
    kinds: dict[str, int]
    rows: int
    rows_by_outcome: dict[str, int]
    charged_nanos: int
    backend_requests: int
    free_calls: list[Call]
    # kind -> the first error message a client saw of that kind.
    messages: dict[str, str] = dataclasses.field(default_factory=dict)
    # What `./dev admin reconcile` printed (it exited 0).
    reconciled: str = ""


async def check_books(mesh: up.Mesh, accounts: list[Account], calls: list[Call], *,
                      free_ok: frozenset[str] = frozenset(), backend_before: int = 0,
                      also_statuses: frozenset[int] = frozenset()) -> Books:
    """Asserts the invariants in this module's docstring; `free_ok` names the request ids
    of calls that may have run without a charge (their holds must then have expired)."""
    for call in calls:
        assert_documented(call, also_statuses)
    # Settlement is asynchronous (batched every few tens of ms): give the last calls' a moment.
    for _ in range(50):
        stats = await journal(mesh)
        if stats.pending_holds == 0:
            break
        await asyncio.sleep(0.1)
    assert stats.sum_of_balances_nanos == 0, stats
    assert stats.pending_holds == 0, stats
    prices = await prices_nanos(mesh)
    by_request, charged = await _check_accounts(mesh, accounts, calls, prices)
    free = _check_calls(calls, by_request, free_ok)

    backend = (await backend_stats(mesh))["requests"] - backend_before
    rows_total = len(by_request)
    # Every call the backend served was held and settled; the only exceptions are the ones the
    # test names (their holds expired), so they bound the difference.
    assert rows_total <= backend <= rows_total + len(free_ok), (backend, rows_total, len(free_ok))
    outcomes: dict[str, int] = {}
    for row in by_request.values():
        outcomes[row.outcome] = outcomes.get(row.outcome, 0) + 1
    messages = {}
    for call in calls:
        if call.error is not None and call.kind not in messages:
            messages[call.kind] = call.error["error"]["message"]
    return Books(calls=len(calls), kinds=tally(calls), rows=rows_total, rows_by_outcome=dict(sorted(outcomes.items())),
                 charged_nanos=charged, backend_requests=backend, free_calls=free, messages=messages,
                 reconciled=await reconcile(mesh))


async def _check_accounts(mesh: up.Mesh, accounts: list[Account], calls: list[Call],
                          prices: dict[str, int]) -> tuple[dict[str, ledger_pb2.UsageRecord], int]:
    """Each account's usage rows and balance; returns the rows by request id and the total charged."""
    worst = max((c.worst_nanos(prices) for c in calls), default=0)
    by_request: dict[str, ledger_pb2.UsageRecord] = {}
    charged = 0
    for account in accounts:
        rows = await usage_rows(mesh, account.account_id)
        costs = 0
        for row in rows:
            assert row.request_id, row
            assert row.request_id not in by_request, f"charged twice: {row} and {by_request[row.request_id]}"
            by_request[row.request_id] = row
            cost = money.parse_usd(row.cost_usd)
            units = {"input_tokens": row.units.input_tokens, "output_tokens": row.units.output_tokens}
            assert cost == (0 if row.outcome == "failed" else cost_nanos(prices, units)), row
            costs += cost
        charged += costs
        held = await balance(mesh, account.account_id)
        assert held.held_nanos == 0, (account, held)
        assert held.balance_nanos == SIGNUP_GRANT_NANOS + account.adjust_nanos - costs, (account, held, costs)
        # The floor: below zero by at most one call's worst case.
        assert held.balance_nanos >= -worst, (account, held, worst)
        ours = {c.request_id for c in calls if c.account is account and c.request_id}
        strangers = [r for r in rows if r.request_id not in ours]
        assert not strangers, f"usage rows for calls nobody made: {strangers[:3]}"
    return by_request, charged


def _check_calls(calls: list[Call], by_request: dict[str, ledger_pb2.UsageRecord],
                 free_ok: frozenset[str]) -> list[Call]:
    """What each client saw against its usage row; returns the calls that ran free (all in free_ok)."""
    free = []
    for call in calls:
        row = by_request.get(call.request_id) if call.request_id else None
        if call.complete:
            assert row is not None or call.request_id in free_ok, f"a completed call has no usage row: {call}"
            if row is None:
                free.append(call)
                continue
            assert row.outcome == "completed", (row, call)
            assert (row.units.input_tokens, row.units.output_tokens) == (
                call.usage["prompt_tokens"], call.usage["completion_tokens"]), (row, call.usage)
            assert row.cost_usd == call.usage["cost"], (row, call.usage)
        elif call.got_output:
            # Cut short after output: charged for what was produced (aborted), or, only where the
            # test documents it, not at all.
            if row is None:
                assert call.request_id in free_ok, f"a call that produced output was not charged: {call}"
                free.append(call)
            else:
                assert row.outcome in ("aborted", "completed"), (row, call)
        elif row is not None:
            # No output: at most a failed (voided, free) row, or a charge for output the
            # client lost on the way (then the row says so).
            assert row.outcome in ("failed", "aborted"), (row, call)
            assert call.status in (200, None) or row.outcome == "failed", (row, call)
    # Charges: one per call the client saw complete, plus one per call cut short after output
    # (for what it produced); nothing else.
    charges = [r for r in by_request.values() if r.outcome != "failed"]
    complete = [c for c in calls if c.complete and c.request_id in by_request]
    cut_and_charged = [c for c in calls if not c.complete and c.got_output and c.request_id in by_request]
    assert len(charges) == len(complete) + len(cut_and_charged), (len(charges), len(complete), len(cut_and_charged))
    return free


def report(title: str, books: Books, **extra) -> None:
    """One line per scenario in the output of `pytest -rA`/-s, the numbers the report quotes."""
    fields = {"calls": books.calls, "kinds": books.kinds, "usage rows": books.rows,
              "rows by outcome": books.rows_by_outcome, "charged USD": money.usd(books.charged_nanos),
              "backend requests": books.backend_requests, **extra, "error messages": books.messages}
    print(f"\n[{title}] " + "; ".join(f"{k}: {v}" for k, v in fields.items()), flush=True)
    print(f"[{title}] ./dev admin reconcile:\n{books.reconciled}", end="", flush=True)
    path = os.environ.get("TOKENS_FAULTS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"scenario": title, **{k: str(v) for k, v in fields.items()},
                                  "reconcile": books.reconciled}) + "\n")
