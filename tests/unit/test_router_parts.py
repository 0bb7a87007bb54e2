"""router_svc's checks of chat content parts (router_svc/domain.py): which part types a model
takes, their data, and the URL rule applied to every image URL before a backend sees it."""
import base64

import pytest
from google.protobuf import json_format

from common import catalog, errors
from router_svc import domain
from tests.dns import FakeDns
from tokens.router.v1 import router_pb2

BACKENDS = (catalog.Backend("http://x", "m"),)
RULES = {"image_url": catalog.InputRule(tokens_each=1445), "input_audio": catalog.InputRule(tokens_per_second=10),
         "file": catalog.InputRule(tokens_per_byte=1, max_bytes=1000)}
VISION = catalog.Model(id="vision", type="text", owned_by="t", created=0, backends=BACKENDS, limits={},
                       pricing={"input_per_million_tokens": "1"}, options={}, inputs=RULES)
TEXT_ONLY = catalog.Model(id="plain", type="text", owned_by="t", created=0, backends=BACKENDS, limits={},
                          pricing={"input_per_million_tokens": "1"}, options={})
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(32)).decode()
WAV = base64.b64encode(b"RIFF" + bytes(60)).decode()
PDF = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.7 " + bytes(100)).decode()


def image(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def body(model: catalog.Model, *parts, role: str = "user") -> dict:
    request = json_format.ParseDict({"model": model.id, "messages": [
        {"role": "system", "content": "be brief"}, {"role": role, "content": list(parts)}]},
        router_pb2.CreateChatCompletionRequest())
    return domain.chat_body(request, model, "backend-model")


def refused(model: catalog.Model, *parts, role: str = "user") -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as caught:
        body(model, *parts, role=role)
    return caught.value


def test_accepted_parts_reach_the_backend_with_checked_urls():
    sent = body(VISION, {"type": "text", "text": "compare"}, image("HTTPS://CDN.Example.com./a%20b\u00e9.png"),
                image(PNG, detail="low"), {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
                {"type": "file", "file": {"filename": "a.pdf", "file_data": PDF}},
                {"type": "file", "file": {"file_data": base64.b64encode(b"plain text").decode()}})
    parts = sent["messages"][1]["content"]
    assert parts[1] == image("https://cdn.example.com/a%20b%C3%A9.png")
    assert parts[2] == image(PNG, detail="low")
    assert parts[3]["input_audio"] == {"data": WAV, "format": "wav"}
    assert parts[4]["file"] == {"filename": "a.pdf", "file_data": PDF}


@pytest.mark.parametrize("part", [
    image("https://cdn.example.com/a.png"), {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
    {"type": "file", "file": {"file_data": PDF}}])
def test_a_model_that_does_not_take_a_part_type_refuses_it_naming_the_part(part):
    error = refused(TEXT_ONLY, {"type": "text", "text": "look"}, part)
    assert (error.param, error.code) == ("messages[1].content[1]", "unsupported_content_part")
    assert "`plain` does not accept" in error.message


@pytest.mark.parametrize("kind", ["video_url", "input_image", "image", "Text", "function"])
def test_unknown_part_types_are_refused(kind):
    assert refused(VISION, {"type": kind, kind: {}}).param == "messages[1].content[0]"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]/", "http://10.0.0.7/",
    "http://172.20.1.1/", "http://192.168.1.1/", "http://100.64.0.1/", "http://[fd00::1]/", "http://224.0.0.1/",
    "http://0.0.0.0/", "http://[::]/", "http://[::ffff:127.0.0.1]/", "http://2130706433/", "http://0x7f.1/",
    "http://public@127.0.0.1/", "http://localhost:8100/v1/files/images/x.png", "file:///etc/passwd",
    "gopher://example.com/", "ftp://example.com/a.png", "javascript:alert(1)", "data:text/html;base64,PGI+",
    "data:image/png,rawbytes", PNG[:-4] + "!!!!", "data:image/png;base64," + "A" * 30_000_000])
def test_image_urls_the_gateway_must_not_relay_are_400_naming_the_url(url):
    error = refused(VISION, {"type": "text", "text": "look"}, image(url))
    assert (error.param, error.code) == ("messages[1].content[1].image_url.url", "invalid_url"), error.message
    assert error.http_status == 400


@pytest.mark.parametrize("part,param", [
    ({"type": "image_url", "image_url": "https://cdn.example.com/a.png"}, "messages[1].content[0].image_url"),
    (image(""), "messages[1].content[0].image_url.url"),
    (image("https://cdn.example.com/a.png", detail="ultra"), "messages[1].content[0].image_url.detail"),
    ({"type": "input_audio", "input_audio": {"data": WAV, "format": "flac"}},
     "messages[1].content[0].input_audio.format"),
    ({"type": "input_audio", "input_audio": {"data": "not base64!", "format": "mp3"}},
     "messages[1].content[0].input_audio.data"),
    ({"type": "input_audio", "input_audio": {"format": "mp3"}}, "messages[1].content[0].input_audio.data"),
    ({"type": "file", "file": {"file_id": "file-abc123"}}, "messages[1].content[0].file.file_id"),
    ({"type": "file", "file": {"filename": "a.pdf"}}, "messages[1].content[0].file.file_data"),
    ({"type": "file", "file": {"file_data": "data:image/png;base64,AAAA"}}, "messages[1].content[0].file.file_data"),
    ({"type": "file", "file": {"file_data": base64.b64encode(bytes(1001)).decode()}},
     "messages[1].content[0].file.file_data"),  # over the rule's max_bytes
    ({"type": "refusal", "refusal": 5}, "messages[1].content[0].refusal"),
])
def test_bad_part_fields_are_400_naming_the_field(part, param):
    assert refused(VISION, part).param == param


def test_media_parts_only_in_user_messages_and_at_most_500():
    assert refused(VISION, image(PNG), role="system").param == "messages[1].content[0]"
    assert refused(VISION, *[image(PNG)] * 501).param == "messages"
    assert len(body(VISION, *[image(PNG)] * 500)["messages"][1]["content"]) == 500


DNS = {"cdn.example.com": ["93.184.215.14"], "img.example.net": ["2606:2800:220:1::1"],
       "rebind.example.com": ["93.184.215.14", "10.0.0.5"], "meta.example.com": ["169.254.169.254"]}


async def test_names_in_image_urls_are_resolved_once_each_and_must_be_public():
    dns = FakeDns(DNS)
    sent = body(VISION, image("https://cdn.example.com/1.png"), image("https://cdn.example.com/2.png"),
                image("https://img.example.net/3.png"), image("https://8.8.8.8/4.png"), image(PNG))
    await domain.check_part_urls(sent, dns)
    assert sorted(dns.hosts) == ["cdn.example.com", "img.example.net"]
    for host, why in [("rebind", "private"), ("meta", "link-local"), ("nowhere", "does not resolve")]:
        sent = body(VISION, image(PNG), image(f"https://{host}.example.com/x.png"))
        with pytest.raises(errors.InvalidRequest) as caught:
            await domain.check_part_urls(sent, FakeDns(DNS))
        assert caught.value.param == "messages[1].content[1].image_url.url" and why in caught.value.message


async def test_at_most_16_hosts_are_looked_up_for_one_call():
    dns = FakeDns({f"h{i}.example.com": ["93.184.215.14"] for i in range(17)})
    many = body(VISION, *[image(f"https://h{i}.example.com/x.png") for i in range(17)])
    with pytest.raises(errors.InvalidRequest) as caught:
        await domain.check_part_urls(many, dns)
    assert caught.value.param == "messages" and dns.asked == []
    await domain.check_part_urls(body(VISION, *[image(f"https://h{i}.example.com/x.png") for i in range(16)]), dns)
    assert len(dns.asked) == 16


async def test_completions_and_text_only_bodies_need_no_lookup():
    dns = FakeDns({})
    await domain.check_part_urls({"model": "m", "prompt": "https://127.0.0.1/"}, dns)
    await domain.check_part_urls(body(VISION, {"type": "text", "text": "http://127.0.0.1/"}), dns)
    assert dns.asked == []
