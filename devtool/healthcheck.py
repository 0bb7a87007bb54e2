"""`python -m devtool.healthcheck PORT`: exit 0 when the gRPC service on
127.0.0.1:PORT reports SERVING (docker-compose health checks, with the
service's own certificate from TOKENS_TLS_DIR). `./dev up` asks the same
question through serving()."""
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import tls


def serving(port: int, timeout_s: float, tls_files: tls.Files | None = None) -> tuple[bool, str]:
    """Whether the service on 127.0.0.1:port reports SERVING, and if not, why."""
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target) if tls_files is None else tls.blocking_channel(target, tls_files)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as error:
            return False, error.code().name
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return False, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return True, "SERVING"


def main() -> int:
    tls_dir = os.environ.get("TOKENS_TLS_DIR", "")
    ok, why = serving(int(sys.argv[1]), timeout_s=2, tls_files=tls.Files.in_dir(tls_dir, "service") if tls_dir else None)
    if not ok:
        print(f"unhealthy: {why}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
