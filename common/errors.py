"""Errors a caller can cause or meet, each knowing its gRPC code and OpenAI shape.

One place (the interceptor in common.grpcserver) turns them into gRPC statuses.
The status message is the exact OpenAI-style JSON body; Envoy's Lua filter
hands it to HTTP callers as the body, and native gRPC callers also get
google.rpc.ErrorInfo (and RetryInfo where it fits) in the status details.
"""
import json

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"
# The most characters of anything a caller sent (a model name, a field, a path, a
# backend's error about it) that an error message repeats: an error never carries a
# large input back, into logs, or into another system's error text.
ECHO_CHARS_MAX = 256
MESSAGE_CHARS_MAX = 1024
_CUT = "..."


def echo(value: object) -> str:
    """`value`, input a caller controls, as an error message may quote it: its first
    ECHO_CHARS_MAX characters, and "..." after them when there were more."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= ECHO_CHARS_MAX else text[:ECHO_CHARS_MAX] + _CUT


class ApiError(Exception):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code=...,
                 retry_after_s: int | None = None) -> None:
        """`code` left out means the class's default; None means JSON null."""
        super().__init__(message)
        # Sites quote a caller's input through echo(); this bounds whatever one missed.
        self.message = message if len(message) <= MESSAGE_CHARS_MAX else message[:MESSAGE_CHARS_MAX] + _CUT
        self.param = None if param is None else echo(param)
        self.code = self.default_code if code is ... else code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def body_json(self) -> str:
        # ASCII only and no '%', so the text survives grpc-message percent-encoding unchanged.
        return json.dumps(self.body(), ensure_ascii=True).replace("%", "\\u0025")

    def status_details(self) -> bytes:
        info = error_details_pb2.ErrorInfo(reason=self.code or self.type, domain="tokens.flex.ai",
                                           metadata={"type": self.type, "param": self.param or ""})
        details = [_pack(info)]
        if self.retry_after_s is not None:
            retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=self.retry_after_s))
            details.append(_pack(retry))
        status = status_pb2.Status(code=self.grpc_code.value[0], message=self.body_json(), details=details)
        return status.SerializeToString()


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class InvalidRequest(ApiError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    type = "invalid_request_error"


class Unauthenticated(ApiError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(ApiError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    type = "invalid_request_error"
    default_code = "permission_denied"


class NotFound(ApiError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class Conflict(ApiError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(ApiError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(ApiError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"


class Unavailable(ApiError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    type = "server_error"
    default_code = "service_unavailable"


class Internal(ApiError):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    type = "server_error"
    default_code = "internal_error"


async def abort(context: grpc.aio.ServicerContext, error: ApiError) -> None:
    await context.abort(error.grpc_code, error.body_json(),
                        trailing_metadata=((DETAILS_KEY, error.status_details()),))
