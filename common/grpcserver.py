"""The shell every service runs in: a grpc.aio server with health, reflection,
error mapping, request ids in logs, mutual TLS (common.tls), and a graceful stop.
"""
import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import config, errors, logs, metrics, tls

log = logging.getLogger(__name__)

# Request metadata a service takes, past grpc's default soft limit of 8 KiB (beyond which it
# refuses calls at random, as RESOURCE_EXHAUSTED): Envoy admits 64 KiB of request headers
# (devtool.envoy_config, max_request_headers_kb) and forwards the path twice (:path and
# x-envoy-original-path), so a call Envoy let in is never refused for its headers here.
METADATA_BYTES_MAX = 192 * 1024


class PortInUse(SystemExit):
    def __init__(self, address: str) -> None:
        super().__init__(f"cannot listen on {address}: the port is taken (or the address is not local)")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Sets the request id for logs, maps ApiError.

    Who may call is settled before this, in the TLS handshake (common.tls). Handlers
    are wrapped once per method and reused: the per-call work is reading one metadata key."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return None
            wrapped = _wrap(handler, details.method)
            self._wrapped[details.method] = wrapped
        return wrapped


_INTERNAL = errors.Internal("the server met an unexpected error; it has been logged")


def _set_request_id(context) -> None:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            logs.request_id.set(value)
            return
    logs.request_id.set("")


def _code(context) -> str:
    code = context.code()
    return code.name if code is not None else "OK"


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    measure = metrics.MethodMetrics(method)
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            started = time.perf_counter()
            try:
                _set_request_id(context)
                return await inner(request, context)
            except errors.ApiError as error:
                await errors.abort(context, error)
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error", extra={"method": method})
                await errors.abort(context, _INTERNAL)
            finally:
                measure.done(_code(context), time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    if handler.unary_stream:
        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            started = time.perf_counter()
            cancelled = False
            try:
                _set_request_id(context)
                async for item in inner_stream(request, context):
                    yield item
            except errors.ApiError as error:
                await errors.abort(context, error)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                cancelled = True
                raise
            except Exception:
                log.exception("unexpected error", extra={"method": method})
                await errors.abort(context, _INTERNAL)
            finally:
                # As for unary calls: refused and failed streams are counted too (an abort
                # leaves by an exception, past any line after the try).
                measure.done("CANCELLED" if cancelled else _code(context), time.perf_counter() - started)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return handler


def _generic_handlers_only(_service: str, _handlers: dict) -> None:
    """Stands in for grpc.aio.Server.add_registered_method_handlers (see create)."""


def create(service_names: Iterable[str], *, max_receive_bytes: int = 4 * 1024 * 1024) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server with health and reflection registered; the caller adds its servicers."""
    options = [
        # Without this, a second process could bind the same port silently.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_metadata_size", METADATA_BYTES_MAX),
        ("grpc.absolute_max_metadata_size", METADATA_BYTES_MAX),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]
    server = grpc.aio.server(interceptors=[ServiceInterceptor()], options=options)
    # The generated add_*_to_server functions register each method twice: as a generic
    # handler, and as a "registered method". grpc.aio then keeps one pending request per
    # registered method and waits on all of them (asyncio.wait) for every call it accepts,
    # work that grows with the number of methods. Generic handlers alone serve every
    # method from one pending request.
    server.add_registered_method_handlers = _generic_handlers_only
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer


def bind(server: grpc.aio.Server, host: str, port: int, tls_files: tls.Files | None = None) -> int:
    """Listens on host:port: with mutual TLS when `tls_files` are given (every service of the
    mesh), else in plaintext (a test's single server on loopback)."""
    address = f"{host}:{port}"
    try:
        if tls_files is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, tls.server_credentials(tls_files))
    except RuntimeError:
        raise PortInUse(address) from None
    if bound == 0:
        raise PortInUse(address)
    return bound


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *names):
        await health_servicer.set(name, status)


async def run_until_signal(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                           names: Iterable[str], settings: config.ServerSettings, *,
                           on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serves (and /metrics on settings.metrics_port) until SIGTERM or SIGINT, then drains:
    NOT_SERVING first so Envoy stops sending calls, settings.drain_s for its health checks
    to notice, then calls in flight get settings.grace_s to finish before the process
    cleans up and exits."""
    names = list(names)
    drain_s, grace_s = settings.drain_s, settings.grace_s
    await server.start()
    metrics.serve(settings.host, settings.metrics_port)
    await set_serving(health_servicer, names, True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: reporting NOT_SERVING", extra={"drain_s": drain_s, "grace_s": grace_s})
    await set_serving(health_servicer, names, False)
    if drain_s > 0:
        await asyncio.sleep(drain_s)
    await server.stop(grace_s)
    if on_stop is not None:
        await on_stop()
    log.info("stopped")
