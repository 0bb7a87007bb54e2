"""Channels from one service to another: round robin over every replica, the
internal credential on every call, and a deadline on every call."""
import grpc

from common import grpcserver


def channel(addresses: str) -> grpc.aio.Channel:
    """`addresses` is "host:port" or "host:port,host:port" (replicas)."""
    targets = [a.strip() for a in addresses.split(",") if a.strip()]
    target = targets[0] if len(targets) == 1 else "ipv4:" + ",".join(targets)
    options = [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    return grpc.aio.insecure_channel(target, options=options)


def metadata(internal_token: str, request_id: str = "") -> tuple[tuple[str, str], ...]:
    pairs = []
    if internal_token:
        pairs.append((grpcserver.INTERNAL_KEY, internal_token))
    if request_id:
        pairs.append(("x-request-id", request_id))
    return tuple(pairs)
