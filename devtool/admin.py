"""`./dev admin`: operators' commands, over the services' internal gRPC methods.

It finds the services through .data/run.json (written by `./dev up`), or
through TOKENS_AUTH_ADDR, TOKENS_LEDGER_ADDR, TOKENS_RATELIMIT_ADDR and
TOKENS_INTERNAL_TOKEN in production.
"""
import argparse
import asyncio
import json
import os
import pathlib
import sys
import uuid

import grpc
from google.protobuf import json_format

from common import clients, migrate, money

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 10.0


def _targets() -> tuple[dict[str, str], str]:
    run_file = pathlib.Path(os.environ.get("TOKENS_DATA_DIR", ROOT / ".data")) / "run.json"
    services, token = {}, os.environ.get("TOKENS_INTERNAL_TOKEN", "")
    if run_file.exists():
        run = json.loads(run_file.read_text())
        services = {name.split("_")[0]: addr for name, addr in run["services"].items()}
        token = token or run["internal_token"]
    for name in ("auth", "ledger", "ratelimit"):
        if os.environ.get(f"TOKENS_{name.upper()}_ADDR"):
            services[name] = os.environ[f"TOKENS_{name.upper()}_ADDR"]
    return services, token


def _print(message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


async def _call(service: str, stub_name: str, method: str, request):
    services, token = _targets()
    if service not in services:
        raise SystemExit(f"where is {service}_svc? Start the mesh with ./dev up, or set "
                         f"TOKENS_{service.upper()}_ADDR and TOKENS_INTERNAL_TOKEN")
    module = {"auth": "tokens.auth.v1.auth_pb2_grpc", "ledger": "tokens.ledger.v1.ledger_pb2_grpc",
              "ratelimit": "tokens.ratelimit.v1.ratelimit_pb2_grpc"}[service]
    grpc_module = __import__(module, fromlist=["x"])
    async with clients.channel(services[service]) as channel:
        stub = getattr(grpc_module, stub_name)(channel)
        try:
            return await getattr(stub, method)(request, timeout=TIMEOUT_S, metadata=clients.metadata(token))
        except grpc.aio.AioRpcError as error:
            detail = error.details() or ""
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise SystemExit(f"{method} failed: {error.code().name}: {detail}") from None


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
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
