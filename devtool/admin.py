"""`./dev admin`: operators' commands, over the services' internal gRPC methods.

It finds the services through .data/run.json (written by `./dev up`), or
through TOKENS_AUTH_ADDR, TOKENS_LEDGER_ADDR, TOKENS_RATELIMIT_ADDR and
TOKENS_TLS_DIR (the mesh's certificates: it presents operator.pem) in
production.
"""
import argparse
import asyncio
import datetime
import decimal
import json
import os
import pathlib
import re
import sys
import uuid

import grpc
from google.protobuf import json_format

from common import clients, migrate, money, tls

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 10.0
# A reconciliation reads the whole journal and pages through Stripe: minutes, not seconds, on a big one.
RECONCILE_TIMEOUT_S = 600.0
RECONCILE_ROWS_DEFAULT = 100
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _targets() -> tuple[dict[str, str], tls.Files | None]:
    run_file = pathlib.Path(os.environ.get("TOKENS_DATA_DIR", ROOT / ".data")) / "run.json"
    services, tls_dir = {}, os.environ.get("TOKENS_TLS_DIR", "")
    if run_file.exists():
        run = json.loads(run_file.read_text())
        services = {name.split("_")[0]: addr for name, addr in run["services"].items()}
        tls_dir = tls_dir or run.get("tls_dir", "")
    for name in ("auth", "ledger", "ratelimit"):
        if os.environ.get(f"TOKENS_{name.upper()}_ADDR"):
            services[name] = os.environ[f"TOKENS_{name.upper()}_ADDR"]
    return services, tls.Files.in_dir(tls_dir, "operator") if tls_dir else None


def _print(message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


async def _call(service: str, stub_name: str, method: str, request):
    services, tls_files = _targets()
    if service not in services:
        raise SystemExit(f"where is {service}_svc? Start the mesh with ./dev up, or set "
                         f"TOKENS_{service.upper()}_ADDR and TOKENS_TLS_DIR")
    module = {"auth": "tokens.auth.v1.auth_pb2_grpc", "ledger": "tokens.ledger.v1.ledger_pb2_grpc",
              "ratelimit": "tokens.ratelimit.v1.ratelimit_pb2_grpc"}[service]
    grpc_module = __import__(module, fromlist=["x"])
    async with clients.channel(services[service], tls_files) as channel:
        stub = getattr(grpc_module, stub_name)(channel)
        try:
            return await getattr(stub, method)(request, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            raise SystemExit(_failure(method, error)) from None


def _failure(method: str, error: grpc.aio.AioRpcError) -> str:
    detail = error.details() or ""
    try:
        detail = json.loads(detail)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return f"{method} failed: {error.code().name}: {detail}"


def parse_since(text: str) -> int:
    """--since: an ISO date or date/time (UTC unless it names an offset) or Unix seconds -> Unix ms."""
    raw = text.strip()
    if re.fullmatch(r"[0-9]{1,11}(\.[0-9]{1,3})?", raw):
        return int(decimal.Decimal(raw) * 1000)
    try:
        moment = datetime.datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an ISO date/time (2026-11-27, 2026-11-27T09:30:00Z) "
                                         "nor Unix seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    since_ms = (moment - _EPOCH) // datetime.timedelta(milliseconds=1)
    if since_ms < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is before 1970")
    return since_ms


async def reconcile(address: str, tls_files: tls.Files | None, *, since_ms: int = 0, rows: int = RECONCILE_ROWS_DEFAULT,
                    timeout_s: float = RECONCILE_TIMEOUT_S, out=None) -> int:
    """Ledger.Reconcile on `address`: prints one line per kind (journal, stripe, lago), then the
    drifting rows. Returns 0 when nothing drifts, else 1."""
    from ledger_svc import reconcile as rules
    from tokens.ledger.v1 import ledger_pb2, ledger_pb2_grpc

    out = out or sys.stdout
    summaries, drifts = [], []
    async with clients.channel(address, tls_files) as channel:
        call = ledger_pb2_grpc.LedgerStub(channel).Reconcile(
            ledger_pb2.ReconcileRequest(since_ms=since_ms, drifts_max=rows), timeout=timeout_s)
        try:
            async for event in call:
                if event.HasField("drift"):
                    drifts.append(event.drift)
                else:
                    summaries.append(event.summary)
        except grpc.aio.AioRpcError as error:
            raise SystemExit(_failure("Reconcile", error)) from None
    for s in summaries:
        figures = tuple(rules.Figure(f.name, f.count if f.has_count else None, f.amount_nanos if f.amount_usd else None)
                        for f in s.figures)
        print(rules.Summary(s.kind, s.status, figures, s.drifts, s.note).line(), file=out)
    total = sum(s.drifts for s in summaries)
    if total:
        listed = f" (the first {len(drifts)} listed)" if len(drifts) < total else ""
        print(f"drifting rows: {total}{listed}", file=out)
        for d in drifts:
            print(f"  {d.kind} {d.check} {d.row}: {d.detail}", file=out)
    if {s.kind for s in summaries} != {rules.JOURNAL, rules.STRIPE, rules.LAGO}:
        print("the reconciliation ended before every kind was checked", file=out)
        return 1
    return 1 if total else 0


async def _run(args) -> None:
    from tokens.auth.v1 import auth_pb2
    from tokens.ledger.v1 import ledger_pb2
    from tokens.ratelimit.v1 import ratelimit_pb2

    if args.command == "account":
        _print(await _call("auth", "AuthAdminStub", "LookupAccount", auth_pb2.LookupAccountRequest(query=args.query)))
    elif args.command == "verify":
        _print(await _call("auth", "AuthAdminStub", "VerifyEmail", auth_pb2.AdminVerifyEmailRequest(query=args.query)))
    elif args.command == "revoke":
        _print(await _call("auth", "AuthAdminStub", "RevokeKey", auth_pb2.AdminRevokeKeyRequest(key_id=args.key_id)))
    elif args.command == "tier":
        _print(await _call("auth", "AuthAdminStub", "SetKeyTier",
                           auth_pb2.SetKeyTierRequest(key_id=args.key_id, tier=args.tier)))
    elif args.command == "account-tier":
        _print(await _call("auth", "AuthAdminStub", "SetAccountTier",
                           auth_pb2.SetAccountTierRequest(account_id=args.account_id, tier=args.tier)))
    elif args.command == "credit":
        try:
            nanos = money.parse_usd(args.amount_usd)
        except money.MoneyError as error:
            raise SystemExit(str(error)) from None
        request = ledger_pb2.CreditRequest(account_id=args.account_id, amount_nanos=nanos, kind="adjustment",
                                           transfer_id=args.id or f"adjustment:{uuid.uuid4()}",
                                           reason=args.reason)
        _print(await _call("ledger", "LedgerStub", "Credit", request))
    elif args.command == "balance":
        _print(await _call("ledger", "LedgerStub", "GetBalance",
                           ledger_pb2.GetBalanceRequest(account_id=args.account_id)))
    elif args.command == "stats":
        _print(await _call("ledger", "LedgerStub", "GetJournalStats", ledger_pb2.GetJournalStatsRequest()))
    elif args.command == "window":
        _print(await _call("ratelimit", "RateLimitAdminStub", "GetKeyWindow",
                           ratelimit_pb2.GetKeyWindowRequest(key_id=args.key_id, tier=args.tier or "")))
    elif args.command == "upgrades":
        if args.action in ("approve", "reject"):
            if not args.id:
                raise SystemExit(f"usage: ./dev admin upgrades {args.action} ID")
            _print(await _call("auth", "AuthAdminStub", "DecideUpgradeRequest",
                               auth_pb2.DecideUpgradeRequestRequest(id=args.id, approve=args.action == "approve")))
        else:
            _print(await _call("auth", "AuthAdminStub", "ListUpgradeRequests",
                               auth_pb2.ListUpgradeRequestsRequest(status=args.status)))
    elif args.command == "migrate":
        for service in ("auth_svc", "ledger_svc", "router_svc"):
            var = f"TOKENS_{service.split('_')[0].upper()}_DATABASE_URL"
            data_dir = pathlib.Path(os.environ.get("TOKENS_DATA_DIR", ROOT / ".data"))
            data_dir.mkdir(parents=True, exist_ok=True)
            url = os.environ.get(var) or f"sqlite:///{data_dir.resolve() / (service.split('_')[0] + '.db')}"
            await migrate.upgrade(service, url, os.environ.get("TOKENS_DATABASE_SCHEMA") or None)
            print(f"{service}: at {migrate.head(service)} ({url.split('@')[-1]})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev admin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("account", help="look up an account by id, email or key id, with its keys")
    p.add_argument("query")
    p = sub.add_parser("verify", help="mark an account's email verified without its link (you checked it)")
    p.add_argument("query", metavar="EMAIL", help="the account's email (or its id, or a key id)")
    p = sub.add_parser("revoke", help="revoke an API key (it stops working on the next call)")
    p.add_argument("key_id")
    p = sub.add_parser("tier", help="set the tier of one key: free, elevated or paid")
    p.add_argument("key_id")
    p.add_argument("tier")
    p = sub.add_parser("account-tier", help="set the tier of every key of an account")
    p.add_argument("account_id")
    p.add_argument("tier")
    p = sub.add_parser("credit", help="add (or, negative, remove) credit, recorded in the journal")
    p.add_argument("account_id")
    p.add_argument("amount_usd", help='USD as a decimal, e.g. 5 or -2.50')
    p.add_argument("--reason", default="operator adjustment")
    p.add_argument("--id", default="", help="transfer id, to make a retry of this command a no-op")
    p = sub.add_parser("balance", help="an account's balance, holds and available credit")
    p.add_argument("account_id")
    sub.add_parser("stats", help="journal totals: debits must equal credits")
    p = sub.add_parser("window", help="a key's current rate-limit window")
    p.add_argument("key_id")
    p.add_argument("--tier", default="")
    p = sub.add_parser("upgrades", help="list upgrade requests, or approve/reject one")
    p.add_argument("action", nargs="?", choices=("list", "approve", "reject"), default="list")
    p.add_argument("id", nargs="?")
    p.add_argument("--status", default="pending")
    p = sub.add_parser("reconcile", help="check the journal against the usage rows, top-ups against Stripe and the "
                                         "Lago export against the settled calls; exit 1 and list the rows on any drift")
    p.add_argument("--since", type=parse_since, default=0, metavar="T",
                   help="only calls, top-ups and exports since T: ISO date/time (UTC unless it says) or Unix "
                        "seconds; default: everything (balances are always checked whole)")
    p.add_argument("--rows", type=int, default=RECONCILE_ROWS_DEFAULT, help="drifting rows to list, at most 1000")
    p.add_argument("--timeout-s", type=float, default=RECONCILE_TIMEOUT_S)
    sub.add_parser("migrate", help="bring every SQL store to the latest migration (TOKENS_*_DATABASE_URL)")
    p = sub.add_parser("makemigration", help="write a new migration from a service's table definitions")
    p.add_argument("service", choices=("auth_svc", "ledger_svc", "router_svc"))
    p.add_argument("message")
    args = parser.parse_args(argv)
    if args.command == "makemigration":
        # Alembic runs its own event loop: not inside ours.
        from devtool import migrations
        migrations.make(args.service, args.message)
        return 0
    if args.command == "reconcile":
        services, tls_files = _targets()
        if "ledger" not in services:
            raise SystemExit("where is ledger_svc? Start the mesh with ./dev up, or set TOKENS_LEDGER_ADDR and "
                             "TOKENS_TLS_DIR")
        return asyncio.run(reconcile(services["ledger"], tls_files, since_ms=args.since, rows=args.rows,
                                     timeout_s=args.timeout_s))
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
