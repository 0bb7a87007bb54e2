"""A stand-in for auth_svc, ratelimit_svc or ledger_svc that does none of their work.

    python -m bench.standin --port P --upstream 127.0.0.1:Q   (TOKENS_TLS_DIR from the environment)

It runs the same gRPC shell as the services (common.grpcserver: the interceptor,
mutual TLS, health, reflection) on the service's port, with the
real service moved to --upstream. For the hot path it does no work of its own:
  - ext_authz Check: the first call for a key (x-ts-key, else the Authorization
    header) on a path goes to the real service; every later one gets that
    answer again, unread;
  - with --settle: the ledger's Settle answers "posted" for every settlement and
    ClaimHolds claims them all, without a database.
Every other unary method (signing up, keys, credit) goes through to the real
service. bench/floor.py measures the chain with these in place: what the chain
costs when the services' own logic is free, the floor of its shape on this machine.
Never run it in front of real customers: it answers calls it never checked.
"""
import argparse
import os
import sys

from common import runtime  # first: it sets gRPC's environment before grpc loads (as every service does)

import grpc  # noqa: E402

from common import clients, config, grpcserver, logs, tls  # noqa: E402

CHECK = "/envoy.service.auth.v3.Authorization/Check"
SETTLE = "/tokens.ledger.v1.Ledger/Settle"
CLAIM = "/tokens.ledger.v1.Ledger/ClaimHolds"
TIMEOUT_S = 10.0
CACHE_MAX = 100_000


def _forwarded(metadata) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in metadata or () if k.startswith("x-"))


class StandIn(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel, settle: bool) -> None:
        from envoy.service.auth.v3 import external_auth_pb2
        from tokens.ledger.v1 import ledger_pb2

        self._channel = channel
        self._settle = settle
        self._checks: dict[tuple[str, str], bytes] = {}
        self._check_type = external_auth_pb2.CheckRequest
        self._ledger = ledger_pb2
        self._calls: dict[str, object] = {}

    def service(self, details):
        method = details.method
        if method == CHECK:
            return grpc.unary_unary_rpc_method_handler(self.check)
        if self._settle and method == SETTLE:
            return grpc.unary_unary_rpc_method_handler(self.settle)
        if self._settle and method == CLAIM:
            return grpc.unary_unary_rpc_method_handler(self.claim)
        return grpc.unary_unary_rpc_method_handler(self._forwarder(method))

    async def _forward(self, method: str, request: bytes, context) -> bytes:
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self._channel.unary_unary(method)
        try:
            return await call(request, metadata=_forwarded(context.invocation_metadata()), timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "", error.trailing_metadata() or ())

    def _forwarder(self, method: str):
        async def forward(request: bytes, context) -> bytes:
            return await self._forward(method, request, context)
        return forward

    async def check(self, request: bytes, context) -> bytes:
        http = self._check_type.FromString(request).attributes.request.http
        key = (http.path, http.headers.get("x-ts-key") or http.headers.get("authorization", ""))
        answer = self._checks.get(key)
        if answer is None:
            answer = await self._forward(CHECK, request, context)
            if len(self._checks) < CACHE_MAX:
                self._checks[key] = answer
        return answer

    async def settle(self, request: bytes, context) -> bytes:
        ledger = self._ledger
        settlements = ledger.SettleRequest.FromString(request).settlements
        return ledger.SettleResponse(results=[ledger.SettleResult(hold_id=s.hold_id, status="posted")
                                              for s in settlements]).SerializeToString()

    async def claim(self, request: bytes, context) -> bytes:
        ledger = self._ledger
        return ledger.ClaimHoldsResponse(claimed=len(ledger.ClaimHoldsRequest.FromString(request).hold_ids)
                                         ).SerializeToString()


async def serve(port: int, upstream: str, settle: bool) -> None:
    logs.setup("standin", "WARNING")
    tls_dir = os.environ.get("TOKENS_TLS_DIR", "")
    settings = config.ServerSettings(host="127.0.0.1", port=port, log_level="WARNING", drain_s=0.0, grace_s=1.0,
                                     tls=tls.Files.in_dir(tls_dir, "service") if tls_dir else None)
    channel = clients.channel(upstream, settings.tls)
    server, health = grpcserver.create([])
    server.add_generic_rpc_handlers((StandIn(channel, settle),))
    grpcserver.bind(server, settings.host, settings.port, settings.tls)
    await grpcserver.run_until_signal(server, health, [], settings, on_stop=channel.close)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the real service")
    parser.add_argument("--settle", action="store_true", help="answer the ledger's Settle and ClaimHolds here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    runtime.run(serve(args.port, args.upstream, args.settle))


if __name__ == "__main__":
    main()
