"""The shared service shell: internal credential, error mapping, health."""
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import errors, grpcserver


async def _ok(request, context):
    return b"ok:" + request


async def _api_error(request, context):
    raise errors.NotFound("no such thing", param="id")


async def _bug(request, context):
    raise ValueError("secret internals")


@pytest.fixture
async def channel():
    server, health = grpcserver.create(["test.Svc"], internal_token="s3cret")
    handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in
                (("Ok", _ok), ("ApiError", _api_error), ("Bug", _bug))}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Svc", handlers),))
    port = grpcserver.bind(server, "127.0.0.1", 0)
    await server.start()
    await grpcserver.set_serving(health, ["test.Svc"], True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan, port
    await server.stop(None)


TOKEN = (("x-ts-internal", "s3cret"),)


async def test_calls_without_the_internal_credential_are_refused(channel):
    chan, _port = channel
    ok = chan.unary_unary("/test.Svc/Ok")
    assert await ok(b"x", metadata=TOKEN) == b"ok:x"
    for metadata in ((), (("x-ts-internal", "wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ok(b"x", metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert json.loads(caught.value.details())["error"]["code"] == "internal_credential_required"


async def test_health_is_open_to_envoy(channel):
    chan, _port = channel
    reply = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_errors_are_mapped_and_internals_not_leaked(channel):
    chan, _port = channel
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chan.unary_unary("/test.Svc/ApiError")(b"", metadata=TOKEN)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert json.loads(caught.value.details())["error"] == {"message": "no such thing", "type": "invalid_request_error",
                                                           "param": "id", "code": "not_found"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chan.unary_unary("/test.Svc/Bug")(b"", metadata=TOKEN)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internals" not in caught.value.details()


async def test_a_taken_port_is_a_clear_error(channel):
    _chan, port = channel
    server, _health = grpcserver.create([])
    with pytest.raises(grpcserver.PortInUse, match="taken"):
        grpcserver.bind(server, "127.0.0.1", port)


async def test_the_health_check_that_compose_and_dev_up_use_follows_the_service():
    """devtool.healthcheck.serving: SERVING, then NOT_SERVING once the service drains, then
    unreachable once it stopped."""
    import asyncio

    from devtool import healthcheck

    server, health = grpcserver.create(["test.Svc"], internal_token="s3cret")
    port = grpcserver.bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        await grpcserver.set_serving(health, ["test.Svc"], True)
        assert await asyncio.to_thread(healthcheck.serving, port, 2) == (True, "SERVING")
        await grpcserver.set_serving(health, ["test.Svc"], False)
        assert await asyncio.to_thread(healthcheck.serving, port, 2) == (False, "NOT_SERVING")
    finally:
        await server.stop(None)
    assert await asyncio.to_thread(healthcheck.serving, port, 0.5) == (False, "UNAVAILABLE")
