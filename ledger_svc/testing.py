"""Helpers for ledger_svc's tests and bench: a fake clock, Envoy-shaped Check requests, a test catalog."""
import pathlib

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import struct_pb2

from tokens.router.v1 import router_pb2

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

CATALOG_YAML = """\
models:
  - id: ref-chat
    type: text
    backends: [{url: "http://127.0.0.1:8100/v1"}]
    limits: {context_window: 32768, max_output_tokens: 4096}
    pricing: {input_per_million_tokens: "0.50", output_per_million_tokens: "1.50"}
  - id: ref-chat-large
    type: text
    backends: [{url: "http://127.0.0.1:8100/v1"}]
    limits: {context_window: 131072, max_output_tokens: 16384}
    pricing: {input_per_million_tokens: "3.00", output_per_million_tokens: "15.00"}
  - id: ref-image
    type: image
    backends: [{url: "http://127.0.0.1:8100/v1"}]
    limits: {max_images: 4}
    pricing: {per_image: "0.04"}
"""


class FakeClock:
    """Unix milliseconds that move only when told to."""

    def __init__(self, start_ms: int = START_MS) -> None:
        self.now_ms = start_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


def write_catalog(directory: pathlib.Path) -> pathlib.Path:
    path = directory / "catalog.yaml"
    path.write_text(CATALOG_YAML)
    return path


def frame(message) -> bytes:
    """A gRPC frame around a message, as Envoy hands the body to ext_authz."""
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def chat_request(model: str = "ref-chat", text: str = "Say hello.", max_tokens: int | None = 64,
                 n: int | None = None) -> router_pb2.CreateChatCompletionRequest:
    request = router_pb2.CreateChatCompletionRequest(
        model=model, messages=[router_pb2.ChatMessage(role="user", content=struct_pb2.Value(string_value=text))])
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if n is not None:
        request.n = n
    return request


def check_request(body: bytes, *, account_id: str = "", key_id: str = "key_1", request_id: str = "req-1",
                  path: str = "/tokens.router.v1.Inference/CreateChatCompletion",
                  grpc_caller: bool = False) -> external_auth_pb2.CheckRequest:
    """What Envoy sends after the transcoder: an HTTP caller's request carries
    x-envoy-original-path; a native gRPC caller's does not."""
    headers = {"content-type": "application/grpc", "x-request-id": request_id, "x-ts-key": key_id,
               "x-ts-auth": "key"}
    if account_id:
        headers["x-ts-account"] = account_id
    if not grpc_caller:
        headers["x-envoy-original-path"] = "/v1/chat/completions"
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="POST", path=path, headers=headers,
                                                               raw_body=body)
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)))
