"""auth_svc for integration tests: build_server on port 0 on a fresh database, in front of a
fake ledger_svc (a real gRPC server) that records the accounts it opens and the emails it is
asked to send, and of a real ratelimit_svc keeping its windows in memory.
test_auth_server.py and test_billing_upgrades.py use it."""
import contextlib

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from auth_svc import config as auth_config, server as auth_server, store as auth_store
from common import config as common_config, db, migrate
from ratelimit_svc import config as ratelimit_config, server as ratelimit_server, store as ratelimit_store
from tokens.auth.v1 import auth_pb2_grpc
from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tokens.ratelimit.v1 import ratelimit_pb2_grpc

PASSWORD = "correct horse battery staple"


class FakeLedger(ledger_pb2_grpc.LedgerServicer):
    """Opens accounts with $10 (refuses while `fail`) and queues emails once per dedupe key
    (refuses while `mail_down`)."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        # account id -> the address the ledger holds for its notices ("" until verified).
        self.addresses: dict[str, str] = {}
        self.emails: list[ledger_pb2.QueueEmailRequest] = []
        self.fail = False
        self.mail_down = False

    async def OpenAccount(self, request, context):
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        if request.account_id not in self.addresses:
            self.opened.append(request.account_id)
        if request.email or request.account_id not in self.addresses:
            self.addresses[request.account_id] = request.email
        return self._balance(request.account_id)

    async def GetBalance(self, request, context):
        return self._balance(request.account_id)

    async def QueueEmail(self, request, context):
        if self.mail_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        duplicate = any(e.dedupe_key == request.dedupe_key for e in self.emails)
        if not duplicate:
            self.emails.append(request)
        return ledger_pb2.QueueEmailResponse(status="duplicate" if duplicate else "queued")

    def _balance(self, account_id):
        return ledger_pb2.Balance(account_id=account_id, balance_nanos=10_000_000_000, balance_usd="10.00",
                                  available_usd="10.00", held_usd="0.00")


    def links(self, address: str) -> list[str]:
        return [e.details["link"] for e in self.emails if e.kind == "verify_email" and e.to == address]


def verify_token(link: str) -> str:
    return link.rsplit("#", 1)[1]


@contextlib.asynccontextmanager
async def serving(db_target, client_limits: dict[str, int] | None = None, **settings):
    """auth_svc on `db_target` (migrated, and checked as a starting service checks it) until the
    block ends: a dict of its stubs (accounts, admin, check), the fake ledger, its state and store.
    `settings` override auth_config.Settings fields; `client_limits` ratelimit_svc's counts."""
    ledger = FakeLedger()
    ledger_server = grpc.aio.server()
    ledger_pb2_grpc.add_LedgerServicer_to_server(ledger, ledger_server)
    ledger_port = ledger_server.add_insecure_port("127.0.0.1:0")
    await ledger_server.start()
    listen = common_config.ServerSettings(host="127.0.0.1", port=0, log_level="INFO", drain_s=0, grace_s=0)
    limits_server, limits_port, _ = ratelimit_server.build_server(
        ratelimit_config.Settings(server=listen, client_limits=client_limits or {}),
        ratelimit_store.MemoryWindowStore())
    await limits_server.start()
    await migrate.upgrade("auth_svc", db_target.url, db_target.schema)
    engine = db.make_engine(db_target.url, schema=db_target.schema)
    await migrate.check("auth_svc", engine)
    store = auth_store.SqlAuthStore(engine)
    config = auth_config.Settings(
        server=common_config.ServerSettings(host="127.0.0.1", port=0, log_level="INFO", drain_s=0, grace_s=1),
        database_url=db_target.url, database_schema=db_target.schema or "",
        ledger_addr=f"127.0.0.1:{ledger_port}", ratelimit_addr=f"127.0.0.1:{limits_port}", argon2_time_cost=1,
        argon2_memory_kib=1024, **settings)
    ledger_channel = grpc.aio.insecure_channel(config.ledger_addr)
    limits_channel = grpc.aio.insecure_channel(config.ratelimit_addr)
    server, port, _health, state = auth_server.build_server(config, store, ledger_pb2_grpc.LedgerStub(ledger_channel),
                                                            ratelimit_pb2_grpc.ClientLimitsStub(limits_channel))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield {"accounts": auth_pb2_grpc.AccountsStub(channel), "admin": auth_pb2_grpc.AuthAdminStub(channel),
               "check": external_auth_pb2_grpc.AuthorizationStub(channel), "ledger": ledger, "state": state,
               "store": store}
    finally:
        await channel.close()
        await server.stop(None)
        state.passwords.close()
        await ledger_channel.close()
        await limits_channel.close()
        await ledger_server.stop(None)
        await limits_server.stop(None)
        await store.close()
