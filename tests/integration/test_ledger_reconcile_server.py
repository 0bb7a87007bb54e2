"""`./dev admin reconcile` against ledger_svc built with build_server on port 0 (SQLite, and
PostgreSQL when its URL is given), with billing on a real localstripe (`python -m
ledger_svc.stripe_local`, test_billing_server's fixture) and the Lago export on. Calls are
held through the real Check and settled through Settle; a top-up is charged on localstripe
and credited as billing credits one (the events localstripe sends are caught and left
alone). Then drifts are planted in the ledger's own database, one per kind, and the
command (a real process, as an operator runs it) must exit 1 and name the row."""
import asyncio
import dataclasses
import io
import os
import sys
import time

import grpc
import pytest
import sqlalchemy as sa
from envoy.service.auth.v3 import external_auth_pb2_grpc

from common import clients, config as common_config, db, migrate
from devtool import admin
from ledger_svc import billing, config, server, store as store_mod, stripe_service, testing
from tests.conftest import ROOT, free_port
from tests.integration.test_billing_server import localstripe  # noqa: F401  (the module's localstripe, a fixture)
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc

pytestmark = pytest.mark.timeout(120)

USD = 1_000_000_000


@dataclasses.dataclass
class Ledger:
    address: str
    settings: config.Settings
    store: store_mod.SqlStore
    billing: stripe_service.Billing
    clock: testing.FakeClock
    check: external_auth_pb2_grpc.AuthorizationStub
    stub: ledger_pb2_grpc.LedgerStub
    holds: list[str] = dataclasses.field(default_factory=list)

    @property
    def md(self) -> tuple:
        return clients.metadata()

    async def call(self, account_id: str, request_id: str, input_tokens: int, output_tokens: int) -> str:
        """A chat call held by the real Check and settled with what the backend reported."""
        answer = await self.check.Check(testing.check_request(testing.frame(testing.chat_request(max_tokens=100)),
                                                              account_id=account_id, request_id=request_id),
                                        metadata=self.md)
        assert answer.HasField("ok_response"), answer
        hold_id = {h.header.key: h.header.value for h in answer.ok_response.headers}["x-ts-hold"]
        settled = await self.stub.Settle(ledger_pb2.SettleRequest(settlements=[ledger_pb2.Settlement(
            hold_id=hold_id, outcome="completed", request_id=request_id, ended_ms=self.clock(),
            units=ledger_pb2.Units(input_tokens=input_tokens, output_tokens=output_tokens))]), metadata=self.md)
        assert settled.results[0].status == "posted", settled
        return hold_id

    async def top_up(self, account_id: str, amount: str, *, credit: bool = True) -> billing.Topup:
        """Charged on localstripe; credited as billing credits a PaymentIntent Stripe says succeeded."""
        topup = await self.billing.create_topup(account_id, amount, "pm_card_visa")
        assert topup.status == billing.PENDING and topup.payment_intent_id, topup
        if credit:
            intent = await self.billing.gateway.intent(topup.payment_intent_id)
            await self.billing.apply(billing.payment_of(billing.SUCCEEDED_EVENT, intent))
        return topup

    async def sql(self, statement) -> None:
        async with self.store.engine.begin() as conn:
            await conn.execute(statement)

    async def reconcile(self, *args: str) -> tuple[int, str]:
        """`./dev admin reconcile ARGS` in a process of its own, pointed at this ledger."""
        env = dict(os.environ, TOKENS_LEDGER_ADDR=self.address,
                   TOKENS_DATA_DIR=str(self.settings.emails_dir.parent / "no-mesh"))
        env.pop("TOKENS_TLS_DIR", None)  # this ledger listens in plaintext on loopback
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "devtool", "admin", "reconcile", *args, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode()


@pytest.fixture
async def ledger(db_target, tmp_path, localstripe):
    await migrate.upgrade("ledger_svc", db_target.url, db_target.schema)
    settings = config.Settings(
        server=common_config.ServerSettings(host="127.0.0.1", port=0, log_level="INFO",
                                            drain_s=0.0, grace_s=1.0),
        database_url=db_target.url, database_schema=db_target.schema, catalog_path=testing.write_catalog(tmp_path),
        signup_credit_nanos=10 * USD, low_balance_nanos=5 * USD, public_base_url=config.PUBLIC_BASE_URL_DEFAULT,
        hold_ttl_s=900, smtp_url="", email_from="billing@test", emails_dir=tmp_path / "emails",
        # The export is on (the outbox fills); nothing here sends it.
        lago_api_url="http://127.0.0.1:9", lago_api_key="", lago_event_code="api_call", batch_max=1000,
        batch_linger_ms=0.0, batch_workers=1, price_refresh_s=2.0, auth_addr=f"127.0.0.1:{free_port()}",
        auth_timeout_s=0.2,
        stripe=config.StripeSettings(api_key="sk_test_reconcile", publishable_key="pk_test_reconcile",
                                     webhook_secret="whsec_reconcile", api_base=localstripe.url, timeout_s=5.0))
    engine = db.make_engine(settings.database_url, schema=settings.database_schema)
    clock = testing.FakeClock(int(time.time() * 1000))  # localstripe stamps PaymentIntents with the real time
    store = server.make_store(settings, engine, clock)
    await server.seed_prices(settings, store)
    service = stripe_service.build(settings, store, clock)
    grpc_server, port, _health = server.build_server(settings, store, clock, billing=service)
    await grpc_server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    made = Ledger(f"127.0.0.1:{port}", settings, store, service, clock,
                  external_auth_pb2_grpc.AuthorizationStub(channel), ledger_pb2_grpc.LedgerStub(channel))
    for account in ("acct_a", "acct_b"):
        await made.stub.OpenAccount(ledger_pb2.OpenAccountRequest(account_id=account, email=f"{account}@x.test"),
                                    metadata=made.md)
    made.holds = [await made.call("acct_a", "req-1", 30, 80), await made.call("acct_b", "req-2", 12, 100)]
    await made.top_up("acct_a", "5.00")
    yield made
    await channel.close()
    await grpc_server.stop(None)
    await service.close()
    await store.close()
    await engine.dispose()


async def test_an_honest_ledger_reconciles_and_the_command_says_what_it_checked(ledger):
    code, out = await ledger.reconcile()
    assert code == 0, out
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["journal", "stripe", "lago"], out
    assert lines[0].startswith("journal: ok; calls 2, posted 2 $0.0"), out
    assert "sum of balances $0.00" in lines[0] and "customer balances $24.99" in lines[0], out
    assert lines[1].startswith("stripe: ok; credited 1 $5.00, payment intents "), out
    assert lines[2].startswith("lago: ok; settled calls 2 $0.0") and "queued 2" in lines[2], out


async def _usage_units(ledger: Ledger) -> str:
    """A usage row whose units do not match its debit."""
    await ledger.sql(store_mod.usage.update().where(store_mod.usage.c.hold_id == ledger.holds[0])
                     .values(output_tokens=4000))
    return f"journal debit_mismatch hold:{ledger.holds[0]}"


async def _credit_without_intent(ledger: Ledger) -> str:
    """A top-up credited without a PaymentIntent."""
    await ledger.stub.Credit(ledger_pb2.CreditRequest(account_id="acct_b", amount_nanos=20 * USD, kind="payment",
                                                      transfer_id="stripe:pi_NeverCharged01", reason="top-up"),
                             metadata=ledger.md)
    return "stripe credited_without_intent transfer:stripe:pi_NeverCharged01"


async def _export_amount(ledger: Ledger) -> str:
    """An exported event with a wrong amount."""
    await ledger.sql(store_mod.lago_outbox.update().where(store_mod.lago_outbox.c.transaction_id == "req-2")
                     .values(cost_nanos=store_mod.lago_outbox.c.cost_nanos * 10, status="sent"))
    return "lago export_amount_mismatch lago:req-2"


@pytest.mark.parametrize("plant", [_usage_units, _credit_without_intent, _export_amount],
                         ids=["journal", "stripe", "lago"])
async def test_a_planted_drift_makes_the_command_exit_1_and_list_the_row(ledger, plant):
    listed = await plant(ledger)
    code, out = await ledger.reconcile()
    assert code == 1, out
    assert f"  {listed}: " in out, out
    kind = listed.split()[0]
    assert f"{kind}: drift; " in out, out
    others = {"journal", "stripe", "lago"} - {kind}
    assert all(f"{other}: ok; " in out for other in others), out


async def test_a_succeeded_payment_intent_never_credited_is_a_drift_once_billing_had_time(ledger):
    topup = await ledger.top_up("acct_b", "7.00", credit=False)
    out = io.StringIO()
    assert await admin.reconcile(ledger.address, None, out=out) == 0, out.getvalue()
    assert "awaiting credit 1" in out.getvalue()
    # Past the slack from when localstripe stamped it (its clock is the real one, and this test's
    # setup may have taken a while since the ledger's fake clock was read).
    created_ms = (await ledger.billing.gateway.intent(topup.payment_intent_id))["created"] * 1000
    ledger.clock.now_ms = created_ms + server.reconcile_policy(ledger.settings).credit_slack_ms + 1000
    out = io.StringIO()
    assert await admin.reconcile(ledger.address, None, out=out) == 1
    assert f"  stripe succeeded_not_credited payment_intent:{topup.payment_intent_id}: $7.00" in out.getvalue()


async def test_since_and_rows_bound_what_is_checked_and_listed(ledger):
    for hold_id in ledger.holds:
        await ledger.sql(store_mod.usage.update().where(store_mod.usage.c.hold_id == hold_id).values(input_tokens=0))
    out = io.StringIO()
    assert await admin.reconcile(ledger.address, None, rows=1, out=out) == 1
    assert "drifting rows: 2 (the first 1 listed)" in out.getvalue(), out.getvalue()
    # The ledger's clock is where the calls were settled; a minute later none is since then.
    since_s = str((ledger.clock() + 60_000) // 1000)
    code, text = await ledger.reconcile("--since", since_s)
    assert code == 0 and "journal: ok; calls 0" in text, text
    code, text = await ledger.reconcile("--since", "yesterday")
    assert code == 2 and "neither an ISO date/time" in text, text


async def test_bad_requests_are_refused_and_one_reconciliation_runs_at_a_time(ledger, monkeypatch):
    for request, param in ((ledger_pb2.ReconcileRequest(since_ms=-1), "since_ms"),
                           (ledger_pb2.ReconcileRequest(drifts_max=1001), "drifts_max")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in ledger.stub.Reconcile(request, metadata=ledger.md):
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and param in refused.value.details()
    inside, release = asyncio.Event(), asyncio.Event()
    scan = ledger.store.scan_calls

    async def held_scan(since_ms, each):
        inside.set()
        await release.wait()
        await scan(since_ms, each)

    monkeypatch.setattr(ledger.store, "scan_calls", held_scan)
    first = asyncio.create_task(admin.reconcile(ledger.address, None, out=io.StringIO()))
    await asyncio.wait_for(inside.wait(), 10)
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        async for _ in ledger.stub.Reconcile(ledger_pb2.ReconcileRequest(), metadata=ledger.md):
            pass
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    release.set()
    assert await asyncio.wait_for(first, 30) == 0
    # A caller without the mesh's certificate is refused at the TLS handshake, before any method
    # runs: tests/abuse/test_edge.py shows it for the ledger (this server is plaintext on loopback).


async def test_every_row_of_a_drifting_journal_is_counted_though_few_are_sent(ledger):
    async with ledger.store.engine.connect() as conn:
        before = (await conn.execute(sa.select(sa.func.count()).select_from(store_mod.transfers))).scalar()
    for n in range(30):
        await ledger.sql(store_mod.transfers.insert().values(
            id=f"post:ghost{n:02d}", kind="post", debit_account_id="acct_a", credit_account_id="sys:revenue",
            amount_nanos=1, pending_id="", reason="", created_ms=ledger.clock()))
    events = [e async for e in ledger.stub.Reconcile(ledger_pb2.ReconcileRequest(drifts_max=5), metadata=ledger.md)]
    drifts = [e.drift for e in events if e.HasField("drift")]
    summaries = {e.summary.kind: e.summary for e in events if e.HasField("summary")}
    assert len(drifts) == 5 and all(d.check == "transfer_without_hold" for d in drifts)
    # The 30 strays, and the two accounts whose columns no longer match their transfers.
    assert summaries["journal"].drifts == 32 and before > 0
