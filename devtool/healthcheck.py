"""`python -m devtool.healthcheck PORT`: exit 0 when the gRPC service on
127.0.0.1:PORT reports SERVING (docker-compose health checks). `./dev up`
asks the same question through serving()."""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def serving(port: int, timeout_s: float) -> tuple[bool, str]:
    """Whether the service on 127.0.0.1:port reports SERVING, and if not, why."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as error:
            return False, error.code().name
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return False, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return True, "SERVING"


def main() -> int:
    ok, why = serving(int(sys.argv[1]), timeout_s=2)
    if not ok:
        print(f"unhealthy: {why}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
