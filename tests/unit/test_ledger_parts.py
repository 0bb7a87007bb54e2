"""The hold of a chat call's image, audio and file parts (ledger_svc/check.py), by the model's rules."""
import base64
import dataclasses
import io

import numpy as np
import pytest
import soundfile
from google.protobuf import json_format

from common import audio, catalog, errors
from ledger_svc import check, domain
from tokens.router.v1 import router_pb2

CATALOG = """models:
  - id: vision
    type: text
    backends: [{url: "http://b/v1"}]
    limits: {max_output_tokens: 100}
    inputs:
      image_url: {tokens_each: 1445}
      input_audio: {tokens_per_second: 10}
      file: {tokens_per_byte: 1}
    pricing: {input_per_million_tokens: "3.00", output_per_million_tokens: "15.00"}
  - id: bounded-files
    type: text
    backends: [{url: "http://b/v1"}]
    inputs:
      file: {tokens_each: 5000}
    pricing: {input_per_million_tokens: "1", output_per_million_tokens: "1"}
  - id: text-only
    type: text
    backends: [{url: "http://b/v1"}]
    pricing: {input_per_million_tokens: "1", output_per_million_tokens: "1"}
"""
IMAGE = {"type": "image_url", "image_url": {"url": "https://cdn.example.com/cat.png"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> catalog.Catalog:
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(CATALOG)
    return catalog.load(path)


def chat(model: str, *contents, max_tokens: int = 10) -> domain.TextCall:
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content} for content in contents]}
    return check.chat_call(json_format.ParseDict(body, router_pb2.CreateChatCompletionRequest()).SerializeToString())


def held(call: domain.TextCall, model: catalog.Model) -> domain.Units:
    """What Check holds: the parts priced by the model's rules, then the text call's worst case."""
    priced = dataclasses.replace(call, part_tokens=check.part_tokens(call.parts, model))
    return domain.worst_text_units(priced, model.limits)


def wav(seconds: float, rate: int = 16_000) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(int(seconds * rate), dtype=np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_each_image_holds_the_rules_tokens_whatever_its_url(models):
    vision = models.get("vision")
    text_only = held(chat("vision", [{"type": "text", "text": "what is this?"}]), vision)
    one = held(chat("vision", [{"type": "text", "text": "what is this?"}, IMAGE]), vision)
    assert one.input_tokens - text_only.input_tokens == 1445
    tiny = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    assert held(chat("vision", [{"type": "text", "text": "what is this?"}, tiny]), vision) == one


def test_twenty_images_hold_twenty_times_the_per_image_tokens_at_the_input_price(models):
    vision = models.get("vision")
    call = chat("vision", [IMAGE] * 12, [{"type": "text", "text": "and"}, *[IMAGE] * 8])
    assert [p.where for p in call.parts][:2] == ["messages[0].content[0]", "messages[0].content[1]"]
    assert call.parts[-1].where == "messages[1].content[8]" and len(call.parts) == 20
    units = held(call, vision)
    assert units.input_tokens == 20 * 1445 + len("and") + 2 * 8 + 8
    # $3 per million input tokens: the images alone hold 20 x 1445 x $0.000003.
    prices = vision.prices_nanos()
    images_only = domain.worst_cost_nanos(prices, units) - domain.worst_cost_nanos(
        prices, domain.Units(input_tokens=units.input_tokens - 20 * 1445, output_tokens=units.output_tokens))
    assert images_only == 20 * 1445 * 3000 == 86_700_000


def test_a_thousand_images_across_messages_are_all_held(models):
    call = chat("vision", *[[IMAGE] * 10] * 100)
    assert held(call, models.get("vision")).input_tokens == 1000 * 1445 + 100 * 8 + 8


def test_audio_with_a_wav_header_holds_its_stated_duration(models):
    data = wav(12.5)
    part = {"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}}
    call = chat("vision", [part])
    assert call.parts[0].kind == "input_audio" and call.parts[0].data_bytes >= len(data)
    assert held(call, models.get("vision")).input_tokens == 125 + 8 + 8  # 12.5 s x 10 tokens


def test_audio_a_header_does_not_describe_holds_its_size_bound(models):
    mp3ish = b"\xff\xfb\x90\x00" + bytes(29_996)  # 30,000 bytes: at least 1 kbit/s is 240 s at most
    part = {"type": "input_audio", "input_audio": {"data": b64(mp3ish), "format": "mp3"}}
    tokens = held(chat("vision", [part]), models.get("vision")).input_tokens - 16
    assert tokens == -(-audio.size_bound_ms(30_000) * 10 // 1000) == 2400
    # A WAV whose header gives no length (a streamed WAV) is held by its size too.
    streamed = bytearray(wav(1))
    streamed[40:44] = b"\xff\xff\xff\xff"
    part = {"type": "input_audio", "input_audio": {"data": b64(bytes(streamed)), "format": "wav"}}
    assert held(chat("vision", [part]), models.get("vision")).input_tokens - 16 == \
        -(-audio.size_bound_ms(len(streamed)) * 10 // 1000)


def test_audio_that_is_not_base64_is_held_by_its_length(models):
    part = {"type": "input_audio", "input_audio": {"data": "%%%% not base64 %%%%" * 100, "format": "wav"}}
    tokens = held(chat("vision", [part]), models.get("vision")).input_tokens - 16
    assert tokens == -(-audio.size_bound_ms(1500) * 10 // 1000)  # 2000 characters: at most 1500 bytes


def test_files_hold_by_their_decoded_size_or_a_bound_per_file(models):
    pdf = b"%PDF-1.7\n" + bytes(991)  # 1,000 bytes
    for file_data in (f"data:application/pdf;base64,{b64(pdf)}", b64(pdf)):
        part = {"type": "file", "file": {"filename": "a.pdf", "file_data": file_data}}
        tokens = held(chat("vision", [part]), models.get("vision")).input_tokens - 16
        assert 1000 <= tokens <= 1002, tokens  # base64 rounds up to 3 bytes per 4 characters
        assert held(chat("bounded-files", [part]), models.get("bounded-files")).input_tokens - 16 == 5000


def test_refusal_parts_count_as_text():
    call = chat("vision", [{"type": "refusal", "refusal": "I cannot help with that."}])
    assert call.text_bytes == len("I cannot help with that.") and call.parts == ()


@pytest.mark.parametrize("part", [
    IMAGE, {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_data": "AAAA"}}])
def test_a_model_that_does_not_accept_a_part_type_refuses_it_naming_the_part(models, part):
    call = chat("text-only", "hello", [{"type": "text", "text": "look"}, part])
    with pytest.raises(errors.InvalidRequest) as caught:
        check.part_tokens(call.parts, models.get("text-only"))
    assert caught.value.param == "messages[1].content[1]" and caught.value.code == "unsupported_content_part"
    assert caught.value.http_status == 400


@pytest.mark.parametrize("kind", ["video_url", "input_image", "image", "TEXT", "tool_result"])
def test_part_types_nobody_knows_are_refused(models, kind):
    call = chat("vision", [IMAGE, {"type": kind, kind: {"url": "https://cdn.example.com/x"}}])
    with pytest.raises(errors.InvalidRequest) as caught:
        check.part_tokens(call.parts, models.get("vision"))
    assert caught.value.param == "messages[0].content[1]"
    assert repr(kind) in caught.value.message


def test_parts_do_not_change_what_a_text_call_compares_equal_to(models):
    """TextCall's equality (and the worst case without a model) is still about the text alone."""
    call = chat("vision", [{"type": "text", "text": "hi"}, IMAGE])
    assert call == domain.TextCall(model="vision", text_bytes=2, segments=1, choices=None, max_tokens=10)
    assert domain.worst_text_units(call, {}).input_tokens == 2 + 8 + 8
