"""Channels from one service to another: round robin over every replica, the mesh's
client certificate (common.tls) on every connection, and a deadline on every call."""
import grpc

from common import tls


def channel(addresses: str, tls_files: tls.Files | None) -> grpc.aio.Channel:
    """`addresses` is "host:port" or "host:port,host:port" (replicas); `tls_files` None
    only for a test's plaintext server."""
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
    if tls_files is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.channel_credentials(tls_files), options=[*options, *tls.CHANNEL_OPTIONS])


def metadata(request_id: str = "") -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id),) if request_id else ()
