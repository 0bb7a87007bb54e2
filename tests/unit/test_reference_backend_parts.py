"""The reference backend's count of chat content parts (backends/reference/parts.py), and that
it stays within what the reference catalog's rules make ledger_svc hold for them."""
import base64
import dataclasses

import pytest
from google.protobuf import json_format

from backends.reference import parts, text
from common import catalog
from ledger_svc import check, domain
from tests import audio
from tokens.router.v1 import router_pb2


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def test_each_part_type_counts_by_its_rule():
    image = {"type": "image_url", "image_url": {"url": "https://cdn.example.com/a.png"}}
    low = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    pdf = {"type": "file", "file": {"file_data": "data:application/pdf;base64," + b64(bytes(1001))}}
    plain = {"type": "file", "file": {"file_data": b64(bytes(8))}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "a b"}, image, low, pdf, plain,
                                             audio_part(audio.sine_wav(2.05)), {"type": "video_url"}]},
                {"role": "assistant", "content": "ok"}]
    assert parts.prompt_tokens(messages) == 765 + 85 + 251 + 2 + 21 + 0
    assert text.chat_prompt_tokens(messages) == 3 + 4 * 2 + 3  # the text rule is unchanged


@pytest.mark.parametrize("part", [
    audio_part(b"not audio at all" * 10), {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}},
    {"type": "input_audio", "input_audio": "x"}, {"type": "image_url", "image_url": "https://x.example.com/a.png"},
    {"type": "file", "file": {"file_data": "data:application/pdf;base64,@@"}}])
def test_parts_it_cannot_read_are_refused(part):
    with pytest.raises(ValueError):
        parts.prompt_tokens([{"role": "user", "content": [part]}])


@pytest.mark.parametrize("seconds,rate", [(0.1, 8000), (1, 16_000), (2.05, 16_000), (7.3, 44_100)])
def test_the_count_never_exceeds_what_the_reference_catalog_holds(seconds, rate):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "describe these"}, audio_part(audio.sine_wav(seconds, rate)),
        {"type": "image_url", "image_url": {"url": "https://cdn.example.com/a.png"}},
        {"type": "file", "file": {"file_data": b64(b"%PDF" + bytes(333))}}]}]
    model = catalog.load(catalog.default_path()).get("ref-chat")
    request = json_format.ParseDict({"model": "ref-chat", "messages": messages},
                                    router_pb2.CreateChatCompletionRequest())
    call = check.chat_call(request.SerializeToString())
    call = dataclasses.replace(call, part_tokens=check.part_tokens(call.parts, model))
    held = domain.worst_text_units(call, model.limits).input_tokens
    assert text.chat_prompt_tokens(messages) + parts.prompt_tokens(messages) <= held
