"""Reading a call's worst case from the gRPC-framed router request Envoy hands the ext_authz Check."""
import gzip
import json

import pytest
from google.protobuf import json_format, struct_pb2

from ledger_svc import check, domain, testing
from tokens.router.v1 import router_pb2

LIMITS = {"context_window": 32768, "max_output_tokens": 4096}


def value(obj) -> struct_pb2.Value:
    message = struct_pb2.Value()
    json_format.ParseDict(obj, message)
    return message


def test_chat_counts_every_byte_of_text_and_the_framing():
    request = router_pb2.CreateChatCompletionRequest(model="ref-chat", max_completion_tokens=50, max_tokens=999, n=3)
    request.messages.add(role="system", content=value("Be brief."))
    request.messages.add(role="user", content=value([
        {"type": "text", "text": "héllo"}, {"type": "image_url", "image_url": {"url": "data:..."}},
        {"type": "text", "text": "wörld"}]))
    request.messages.add(role="assistant", content=value(None))
    call = check.chat_call(testing.frame(request)[5:])
    assert call == domain.TextCall(model="ref-chat", text_bytes=len("Be brief.") + 6 + 6, segments=3, choices=3,
                                   max_tokens=50)
    units = domain.worst_text_units(call, LIMITS)
    assert units == domain.Units(input_tokens=21 + 3 * 8 + 8, output_tokens=150)


def test_chat_counts_tools_and_response_format_as_json():
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    request = router_pb2.CreateChatCompletionRequest(model="ref-chat")
    request.messages.add(role="user", content=value("hi"))
    request.tools.add().update(tool)
    request.response_format.update({"type": "json_object"})
    call = check.chat_call(request.SerializeToString())
    at_least = len("hi") + len(json.dumps(tool, separators=(",", ":"))) + len('{"type":"json_object"}')
    assert call.text_bytes >= at_least
    assert call.max_tokens is None and call.choices is None
    assert domain.worst_text_units(call, LIMITS).output_tokens == 4096


def test_completions_count_each_prompt_and_produce_per_prompt():
    request = router_pb2.CreateCompletionRequest(model="ref-chat", prompt=value(["one two", "three"]), n=2,
                                                 best_of=4, max_tokens=10, suffix="!")
    call = check.completion_call(request.SerializeToString())
    assert (call.text_bytes, call.segments, call.choices, call.max_tokens) == (7 + 2 + 5 + 2 + 1, 2, 4, 10)
    assert domain.worst_text_units(call, LIMITS).output_tokens == 2 * 4 * 10
    tokens = router_pb2.CreateCompletionRequest(model="ref-chat", prompt=value([1, 2, 3, 4]))
    call = check.completion_call(tokens.SerializeToString())
    assert (call.text_bytes, call.segments) == (4, 1)
    assert domain.worst_text_units(call, LIMITS) == domain.Units(4 + 8 + 8, 4096)


def test_the_reference_backends_token_count_is_below_the_estimate():
    """backends/reference counts words + 4 per message + 3: always under bytes + 8 per message + 8."""
    messages = [("user", "a b c d e f g"), ("assistant", "x"), ("user", "   spaced    out   ")]
    request = router_pb2.CreateChatCompletionRequest(model="ref-chat")
    for role, text in messages:
        request.messages.add(role=role, content=value(text))
    words = sum(len(text.split()) for _, text in messages) + 4 * len(messages) + 3
    assert domain.worst_text_units(check.chat_call(request.SerializeToString()), LIMITS).input_tokens >= words


def test_frames():
    message = testing.chat_request().SerializeToString()
    assert check.unframe(b"\x00" + len(message).to_bytes(4, "big") + message) == message
    packed = gzip.compress(message)
    assert check.unframe(b"\x01" + len(packed).to_bytes(4, "big") + packed, "gzip") == message
    for broken in (b"", b"\x00\x00", b"\x00\x00\x00\x00\x05abc", b"\x00\x00\x00\x00\x01ab", b"\x02\x00\x00\x00\x00"):
        with pytest.raises(check.BodyError):
            check.unframe(broken)
    with pytest.raises(check.BodyError):
        check.unframe(b"\x01" + len(packed).to_bytes(4, "big") + packed, "snappy")
    with pytest.raises(check.BodyError):
        check.chat_call(b"\xff\xff\xff")
