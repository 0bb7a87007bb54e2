"""The worst cases ledger_svc holds for media calls, read from the gRPC-framed bodies Envoy
hands the Check (whole, or only the first 64 KiB of an upload), and the x-ts-held header."""
import gzip
import io
import json
import struct

import numpy as np
import pytest
import soundfile
from google.api import httpbody_pb2

from common import audio, catalog, pricing
from ledger_svc import check, domain, testing
from tokens.router.v1 import router_pb2

INFERENCE = "/tokens.router.v1.Inference/"
CATALOG = """models:
  - id: ref-image
    type: image
    backends: [{url: "http://b/v1"}]
    limits: {max_images: 4}
    pricing: {per_image: "0.04"}
  - id: ref-video
    type: video
    backends: [{url: "http://b/v1"}]
    limits: {max_video_seconds: 12}
    options: {default_seconds: 4}
    pricing: {per_second: "0.10"}
  - id: ref-tts
    type: tts
    backends: [{url: "http://b/v1"}]
    limits: {max_input_characters: 100}
    pricing: {per_character: "0.000015"}
  - id: ref-stt
    type: stt
    backends: [{url: "http://b/v1"}]
    limits: {max_audio_seconds: 3600}
    pricing: {per_minute: "0.006"}
  - id: cheap-stt
    type: stt
    backends: [{url: "http://b/v1"}]
    pricing: {per_minute: "0.001"}
  - id: ref-chat
    type: text
    backends: [{url: "http://b/v1"}]
    pricing: {input_per_million_tokens: "1", output_per_million_tokens: "1"}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> catalog.Catalog:
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(CATALOG)
    return catalog.load(path)


def wav(seconds: float, rate: int = 16_000, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros((int(seconds * rate), channels), dtype=np.float32), rate, format="WAV",
                    subtype=subtype)
    return out.getvalue()


def flac(seconds: float, rate: int = 44_100) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(int(seconds * rate), dtype=np.float32), rate, format="FLAC")
    return out.getvalue()


def form(fields: list[tuple[str, str]], file: bytes | None = None, file_first: bool = False) -> tuple[str, bytes]:
    boundary = "XyZ123"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields]
    if file is not None:
        upload = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n").encode() + file + b"\r\n"
        parts = [upload, *parts] if file_first else [*parts, upload]
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


def http_body_frame(content_type: str, data: bytes, window: int | None = None) -> bytes:
    """As Envoy hands it over: the gRPC frame of a google.api.HttpBody, perhaps cut at `window` bytes."""
    raw = testing.frame(httpbody_pb2.HttpBody(content_type=content_type, data=data))
    return raw if window is None else raw[:window]


# --- images, video, speech ------------------------------------------------------------

def test_images_hold_n_times_the_price_clamped_to_the_models_limit(models):
    image = models.get("ref-image")
    for n, held in ((None, 1), (2, 2), (4, 4), (9, 4), (0, 1), (-3, 1)):
        request = router_pb2.CreateImageRequest(model="ref-image", prompt="p")
        if n is not None:
            request.n = n
        call = check.image_call(request.SerializeToString())
        assert check.worst_media_units(call, image) == domain.Units(images=held), n
    units = check.worst_media_units(check.image_call(router_pb2.CreateImageRequest(n=2).SerializeToString()), image)
    assert domain.worst_cost_nanos(image.prices_nanos(), units) == 80_000_000


def test_speech_holds_every_code_point(models):
    tts = models.get("ref-tts")
    call = check.speech_call(router_pb2.CreateSpeechRequest(model="ref-tts", input="hello world").SerializeToString())
    assert check.worst_media_units(call, tts) == domain.Units(characters=11)
    emoji = check.speech_call(router_pb2.CreateSpeechRequest(model="ref-tts", input="héllo 🎉").SerializeToString())
    assert check.worst_media_units(emoji, tts).characters == 7  # code points, not UTF-8 bytes (11)
    long = check.speech_call(router_pb2.CreateSpeechRequest(model="ref-tts", input="x" * 500).SerializeToString())
    assert check.worst_media_units(long, tts).characters == 100  # the router refuses more
    assert domain.worst_cost_nanos(tts.prices_nanos(), domain.Units(characters=11)) == 165_000


@pytest.mark.parametrize("body,seconds", [
    (form([("model", "ref-video"), ("prompt", "p"), ("seconds", "8")]), 8),
    (form([("model", "ref-video"), ("prompt", "p")]), 4),
    (form([("model", "ref-video"), ("seconds", "99")]), 12),
    (form([("model", "ref-video"), ("seconds", "eight")]), 12),
    (("application/json", json.dumps({"model": "ref-video", "seconds": 8}).encode()), 8),
    (("application/json", json.dumps({"model": "ref-video", "seconds": "12"}).encode()), 12),
    (("application/json", json.dumps({"model": "ref-video", "seconds": 2.5}).encode()), 12),
    (("application/x-www-form-urlencoded", b"model=ref-video&seconds=1"), 1),
])
def test_video_holds_the_requested_seconds(models, body, seconds):
    call = check.video_call(http_body_frame(*body))
    assert call.model == "ref-video"
    assert check.worst_media_units(call, models.get("ref-video")) == domain.Units(video_ms=seconds * 1000)


def test_video_bodies_that_cannot_be_read(models):
    with pytest.raises(check.BodyError):
        check.video_call(http_body_frame("application/json", b"[1, 2]"))
    with pytest.raises(check.BodyError):
        check.video_call(http_body_frame("text/plain", b"hello"))
    with pytest.raises(check.BodyError):
        check.video_call(b"\x00\x00\x00\x00\x03\x0a\x01")


# --- transcription --------------------------------------------------------------------

def test_wav_and_flac_headers_give_the_exact_duration():
    for data, seconds in ((wav(30), 30), (wav(1.5, 44_100, 2), 1.5), (wav(2, 8000, 1, "FLOAT"), 2),
                          (flac(12.25), 12.25)):
        assert audio.worst_ms(data[:64 * 1024], len(data))[0] == seconds * 1000
    id3 = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10 + flac(3)
    assert audio.worst_ms(id3, len(id3)) == (3000, "flac header")


def test_other_files_are_bounded_by_their_size():
    assert audio.worst_ms(b"\xff\xfb\x90\x00" + b"\x00" * 100, 1_000_000) == (8_000_000, "size bound")
    streamed = bytearray(wav(1))
    streamed[40:44] = b"\xff\xff\xff\xff"  # a data chunk of unknown size (a streamed WAV)
    assert audio.worst_ms(bytes(streamed), 125_000)[1] == "size bound"
    adpcm = bytearray(wav(1))
    adpcm[20:22] = struct.pack("<H", 2)  # MS ADPCM: no frame per block, so the header is not trusted
    assert audio.worst_ms(bytes(adpcm), 1250)[0] == 10_000
    assert audio.size_bound_ms(0) == 0 and audio.size_bound_ms(1) == 8


def test_transcription_reads_the_first_64_kib_of_a_large_upload(models):
    data = wav(30)  # ~960 KB: only its header reaches the ledger
    content_type, body = form([("model", "ref-stt"), ("language", "en")], data)
    raw = http_body_frame(content_type, body, window=64 * 1024)
    call = check.transcription_call(raw, partial=True)
    assert call.model == "ref-stt" and call.upload_bytes == len(data)
    assert check.worst_media_units(call, models.get("ref-stt")) == domain.Units(audio_ms=30_000)
    price = models.get("ref-stt").prices_nanos()
    assert domain.worst_cost_nanos(price, domain.Units(audio_ms=30_000)) == 3_000_000  # half the minute price


def test_an_mp3_is_held_for_its_size_bound_capped_by_the_models_limit(models):
    data = b"\xff\xfb\x90\x00" + bytes(299_996)
    content_type, body = form([("model", "ref-stt")], data)
    call = check.transcription_call(http_body_frame(content_type, body, window=64 * 1024), partial=True)
    assert call.upload_bytes == len(data)
    assert check.worst_media_units(call, models.get("ref-stt")).audio_ms == audio.size_bound_ms(call.upload_bytes)
    assert 2_400_000 <= audio.size_bound_ms(call.upload_bytes) <= 2_400_016  # 300 kB at 125 bytes a second
    big = b"\xff\xfb\x90\x00" + bytes(999_996)
    content_type, body = form([("model", "ref-stt")], big)
    call = check.transcription_call(http_body_frame(content_type, body, window=64 * 1024), partial=True)
    assert check.worst_media_units(call, models.get("ref-stt")).audio_ms == 3_600_000


def test_gzip_compressed_native_grpc_uploads(models):
    content_type, body = form([("model", "ref-stt")], wav(5))
    message = httpbody_pb2.HttpBody(content_type=content_type, data=body).SerializeToString()
    packed = gzip.compress(message)
    raw = b"\x01" + len(packed).to_bytes(4, "big") + packed
    for window in (None, 2000):
        call = check.transcription_call(raw if window is None else raw[:window], "gzip", partial=window is not None)
        assert call.model == "ref-stt"
        assert check.worst_media_units(call, models.get("ref-stt")).audio_ms == 5000


def test_an_upload_over_25_mb_is_413_and_fields_must_come_early():
    content_type, body = form([("model", "ref-stt")], bytes(audio.UPLOAD_BYTES_MAX + 1))
    with pytest.raises(check.UploadTooLarge) as caught:
        check.transcription_call(http_body_frame(content_type, body, window=64 * 1024), partial=True)
    assert caught.value.http_status == 413
    ok_type, ok_body = form([("model", "ref-stt")], bytes(audio.UPLOAD_BYTES_MAX))
    assert check.transcription_call(http_body_frame(ok_type, ok_body, window=64 * 1024), partial=True).upload_bytes \
        == audio.UPLOAD_BYTES_MAX
    content_type, body = form([("prompt", "x" * 70_000), ("model", "ref-stt")], wav(1))
    with pytest.raises(check.errors.InvalidRequest):
        check.transcription_call(http_body_frame(content_type, body, window=64 * 1024), partial=True)


def test_a_missing_file_holds_nothing_and_the_model_may_come_after_the_file(models):
    content_type, body = form([("model", "ref-stt")])
    call = check.transcription_call(http_body_frame(content_type, body))
    assert check.worst_media_units(call, models.get("ref-stt")) == domain.Units(audio_ms=0)
    data = b"OggS" + bytes(200_000)
    content_type, body = form([("model", "cheap-stt")], data, file_first=True)
    call = check.transcription_call(http_body_frame(content_type, body, window=64 * 1024), partial=True)
    assert call.model == "" and call.upload_bytes >= len(data)  # unseen: the Check picks the priciest stt model
    small_type, small_body = form([("model", "cheap-stt")], b"OggS" + bytes(100), file_first=True)
    assert check.transcription_call(http_body_frame(small_type, small_body)).model == "cheap-stt"


# --- the Check itself -----------------------------------------------------------------

class FakeStore:
    """What Authorization.Check reads: the price book, and holds."""

    def __init__(self, models: catalog.Catalog) -> None:
        self.price_book = domain.PriceBook([domain.PriceVersion.of(m.id, 1, 0, m.prices_nanos())
                                            for m in models.models.values()])
        self.holds: list[domain.HoldRequest] = []

    async def hold(self, request: domain.HoldRequest) -> domain.HoldDecision:
        self.holds.append(request)
        return domain.HoldDecision(domain.HoldResult.ADMITTED, request.hold_id, 10**10)


def check_request(body: bytes, method: str, partial: bool = False):
    request = testing.check_request(body, account_id="acct_1", path=INFERENCE + method)
    if partial:
        request.attributes.request.http.headers[check.PARTIAL_HEADER] = "true"
    return request


async def _check(models, body: bytes, method: str, partial: bool = False):
    store = FakeStore(models)
    authorization = check.Authorization(store, models, testing.FakeClock(), "https://tokens.flex.ai")
    answer = await authorization.Check(check_request(body, method, partial), None)
    return answer, store.holds


async def test_check_holds_media_and_says_what_was_held(models):
    answer, [hold] = await _check(models, testing.frame(router_pb2.CreateImageRequest(
        model="ref-image", prompt="p", n=2)), "CreateImage")
    headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
    assert headers["x-ts-held"] == "model=ref-image,images=2"
    assert pricing.decode_header(headers["x-ts-price"]) == {"per_image": 40_000_000}
    assert hold.amount_nanos == 80_000_000 and hold.model == "ref-image"
    content_type, body = form([("model", "ref-stt")], wav(30))
    answer, [hold] = await _check(models, http_body_frame(content_type, body, 64 * 1024), "CreateTranscription",
                                  partial=True)
    headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
    assert headers["x-ts-held"] == "model=ref-stt,audio_ms=30000" and hold.amount_nanos == 3_000_000


async def test_check_says_what_it_held_for_a_text_call(models):
    request = router_pb2.CreateChatCompletionRequest(model="ref-chat", n=2, max_completion_tokens=50)
    request.messages.add(role="user").content.string_value = "héllo"
    answer, [hold] = await _check(models, testing.frame(request), "CreateChatCompletion")
    headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
    assert headers["x-ts-held"] == f"model=ref-chat,input_tokens={6 + 8 + 8},output_tokens=100"
    prices = pricing.decode_header(headers["x-ts-price"])
    assert hold.amount_nanos == pricing.cost_nanos(prices, {"input_tokens": 22, "output_tokens": 100})


async def test_check_holds_an_unseen_model_as_the_priciest_of_its_type(models):
    content_type, body = form([("model", "cheap-stt")], b"OggS" + bytes(200_000), file_first=True)
    answer, [hold] = await _check(models, http_body_frame(content_type, body, 64 * 1024), "CreateTranscription",
                                  partial=True)
    headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
    assert hold.model == "ref-stt" and headers["x-ts-held"].startswith("model=ref-stt,")


async def test_check_refusals_for_media(models):
    answer, holds = await _check(models, testing.frame(router_pb2.CreateSpeechRequest(model="ref-image", input="x")),
                                 "CreateSpeech")
    assert answer.denied_response.status.code == 400 and not holds
    assert json.loads(answer.denied_response.body)["error"]["message"] == "The model `ref-image` is not a tts model."
    content_type, body = form([("model", "ref-stt")], bytes(audio.UPLOAD_BYTES_MAX + 10))
    answer, holds = await _check(models, http_body_frame(content_type, body, 64 * 1024), "CreateTranscription",
                                 partial=True)
    assert answer.denied_response.status.code == 413 and not holds
    assert json.loads(answer.denied_response.body)["error"]["code"] == "file_too_large"
    answer, holds = await _check(models, b"", "GetVideo")
    assert answer.HasField("ok_response") and not holds
