"""The shared service shell: mutual TLS, error mapping, health."""
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import errors, grpcserver, tls
from devtool import certs


async def _ok(request, context):
    return b"ok:" + request


async def _api_error(request, context):
    raise errors.NotFound("no such thing", param="id")


async def _bug(request, context):
    raise ValueError("secret internals")


@pytest.fixture(scope="module")
def mesh_certs(tmp_path_factory):
    """A mesh's certificates, and another mesh's (same names, another CA)."""
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    certs.make(ours)
    certs.make(theirs)
    return ours, theirs


@pytest.fixture
async def served(mesh_certs):
    """A server of the shell on mutual TLS: (port, our client certificate's files)."""
    ours, _theirs = mesh_certs
    server, health = grpcserver.create(["test.Svc"])
    handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in
                (("Ok", _ok), ("ApiError", _api_error), ("Bug", _bug))}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Svc", handlers),))
    port = grpcserver.bind(server, "127.0.0.1", 0, tls.Files.in_dir(ours, "service"))
    await server.start()
    await grpcserver.set_serving(health, ["test.Svc"], True)
    yield port, tls.Files.in_dir(ours, "operator")
    await server.stop(None)


@pytest.fixture
async def channel(served):
    port, files = served
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(files),
                                       options=tls.CHANNEL_OPTIONS) as chan:
        yield chan, port


async def test_calls_without_a_certificate_of_the_mesh_never_reach_a_method(served, mesh_certs):
    """Plaintext, TLS without a client certificate, and a certificate from another CA with
    the same names are all refused in the handshake; the mesh's own certificate works."""
    port, files = served
    target = f"127.0.0.1:{port}"
    ca = files.ca.read_bytes()
    other = tls.Files.in_dir(mesh_certs[1], "operator")
    strangers = {
        "plaintext": grpc.aio.insecure_channel(target),
        "no client certificate": grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca),
                                                         options=tls.CHANNEL_OPTIONS),
        "another CA's certificate": grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(ca, other.key.read_bytes(), other.cert.read_bytes()),
            options=tls.CHANNEL_OPTIONS),
    }
    for name, stranger in strangers.items():
        async with stranger:
            for method in ("/test.Svc/Ok", "/grpc.health.v1.Health/Check"):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stranger.unary_unary(method)(b"", timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, (name, method, caught.value)
    async with grpc.aio.secure_channel(target, tls.channel_credentials(files), options=tls.CHANNEL_OPTIONS) as ours:
        assert await ours.unary_unary("/test.Svc/Ok")(b"x", timeout=5) == b"ok:x"


async def test_health_answers_the_mesh(channel):
    chan, _port = channel
    reply = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_errors_are_mapped_and_internals_not_leaked(channel):
    chan, _port = channel
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chan.unary_unary("/test.Svc/ApiError")(b"")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert json.loads(caught.value.details())["error"] == {"message": "no such thing", "type": "invalid_request_error",
                                                           "param": "id", "code": "not_found"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chan.unary_unary("/test.Svc/Bug")(b"")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internals" not in caught.value.details()


async def test_a_taken_port_is_a_clear_error(channel):
    _chan, port = channel
    server, _health = grpcserver.create([])
    with pytest.raises(grpcserver.PortInUse, match="taken"):
        grpcserver.bind(server, "127.0.0.1", port)


async def test_the_health_check_that_compose_and_dev_up_use_follows_the_service(mesh_certs):
    """devtool.healthcheck.serving (with the service's certificate, as compose runs it):
    SERVING, then NOT_SERVING once the service drains, then unreachable once it stopped."""
    import asyncio

    from devtool import healthcheck

    files = tls.Files.in_dir(mesh_certs[0], "service")
    server, health = grpcserver.create(["test.Svc"])
    port = grpcserver.bind(server, "127.0.0.1", 0, files)
    await server.start()
    try:
        await grpcserver.set_serving(health, ["test.Svc"], True)
        assert await asyncio.to_thread(healthcheck.serving, port, 2, files) == (True, "SERVING")
        assert await asyncio.to_thread(healthcheck.serving, port, 2) == (False, "UNAVAILABLE")  # no certificate
        await grpcserver.set_serving(health, ["test.Svc"], False)
        assert await asyncio.to_thread(healthcheck.serving, port, 2, files) == (False, "NOT_SERVING")
    finally:
        await server.stop(None)
    assert await asyncio.to_thread(healthcheck.serving, port, 0.5, files) == (False, "UNAVAILABLE")
