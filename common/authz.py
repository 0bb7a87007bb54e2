"""Building Envoy ext_authz answers (envoy.service.auth.v3) for the three filters.

Every filter answers allow() or deny(). deny() shapes the body the caller sees
exactly; for native gRPC callers it also sets grpc-status and the rich status
details, so a 429 is RESOURCE_EXHAUSTED with RetryInfo, not Envoy's UNAVAILABLE.
"""
import base64
import urllib.parse
from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from common import errors

_OK = status_pb2.Status(code=code_pb2.OK)
_DENIED = status_pb2.Status(code=code_pb2.PERMISSION_DENIED)
_JSON = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="content-type", value="application/json"))


def header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))


def headers(pairs: Iterable[tuple[str, str]]) -> list[base_pb2.HeaderValueOption]:
    return [header(k, v) for k, v in pairs]


def allow(upstream: Iterable[base_pb2.HeaderValueOption] = (), *, remove: Iterable[str] = (),
          response: Iterable[base_pb2.HeaderValueOption] = ()) -> external_auth_pb2.CheckResponse:
    """Let the call through. `upstream` headers overwrite what the client sent;
    `response` headers are added to whatever response the client finally gets."""
    return external_auth_pb2.CheckResponse(
        status=_OK,
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=upstream, headers_to_remove=remove, response_headers_to_add=response))


def is_grpc(http_request) -> bool:
    """A native gRPC caller. Calls the transcoder made from HTTP/JSON also carry
    application/grpc by the time later filters see them, but keep the original
    path in x-envoy-original-path (which Envoy never accepts from a client)."""
    headers = http_request.headers
    return headers.get("content-type", "").startswith("application/grpc") \
        and "x-envoy-original-path" not in headers


def deny(error: errors.ApiError, http_request, *, extra: Iterable[base_pb2.HeaderValueOption] = (),
         http_status: int | None = None, body: str | None = None) -> external_auth_pb2.CheckResponse:
    """Refuse the call with `error` as an OpenAI-shaped body (or `body` verbatim)."""
    text = body if body is not None else error.body_json()
    out = [_JSON, *extra]
    if is_grpc(http_request):
        out.append(header("grpc-status", str(error.grpc_code.value[0])))
        out.append(header("grpc-message", urllib.parse.quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")))
        out.append(header(errors.DETAILS_KEY, base64.b64encode(error.status_details()).decode().rstrip("=")))
    return external_auth_pb2.CheckResponse(
        status=_DENIED,
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status or error.http_status),
            headers=out, body=text))
