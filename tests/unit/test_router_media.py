"""router_svc's media rules without a network: validation against catalog options, what
may be charged against what was held, reading forms, and the video job's numbers."""
import json

import pytest

from common import catalog, errors, held, multipart
from common.held import Held
from router_svc import domain, media
from tokens.router.v1 import router_pb2

CATALOG = """models:
  - id: img
    type: image
    backends: [{url: "http://b/v1"}]
    limits: {max_images: 3}
    options: {sizes: [512x512, 1024x1024], default_size: 1024x1024, max_prompt_characters: 20}
    pricing: {per_image: "0.04"}
  - id: vid
    type: video
    backends: [{url: "http://b/v1"}]
    limits: {max_video_seconds: 12}
    options: {sizes: [720x1280], min_seconds: 2, default_seconds: 4}
    pricing: {per_second: "0.10"}
  - id: tts
    type: tts
    backends: [{url: "http://b/v1"}]
    limits: {max_input_characters: 10}
    options: {voices: [alloy], response_formats: [mp3, wav]}
    pricing: {per_character: "0.000015"}
  - id: stt
    type: stt
    backends: [{url: "http://b/v1"}]
    limits: {max_audio_seconds: 60}
    options: {response_formats: [json, text]}
    pricing: {per_minute: "0.006"}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> catalog.Catalog:
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(CATALOG)
    return catalog.load(path)


def refused(fn, *args) -> errors.ApiError:
    with pytest.raises(errors.ApiError) as caught:
        fn(*args)
    return caught.value


def test_models_are_found_by_type(models):
    assert domain.model_for(models, "img", "image").id == "img"
    assert refused(domain.model_for, models, "", "image").code == "missing_model"
    assert refused(domain.model_for, models, "nope", "image").http_status == 404
    assert refused(domain.model_for, models, "tts", "image").param == "model"


def test_image_requests(models):
    model = models.get("img")
    ask = media.image_request(router_pb2.CreateImageRequest(prompt="a fox", n=3), model)
    assert (ask.n, ask.size, ask.response_format) == (3, "1024x1024", "b64_json")
    assert ask.backend_body()["response_format"] == "b64_json"  # URLs are the gateway's own
    url = media.image_request(router_pb2.CreateImageRequest(prompt="a fox", response_format="url",
                                                            size="512x512", quality="hd"), model)
    assert url.response_format == "url" and url.backend_body()["quality"] == "hd"
    for fields, param in (({"prompt": ""}, "prompt"), ({"prompt": "x" * 21}, "prompt"), ({"n": 0}, "n"),
                          ({"n": 4}, "n"), ({"n": -1}, "n"), ({"size": "256x256"}, "size"),
                          ({"response_format": "jpeg"}, "response_format"), ({"quality": "ultra"}, "quality")):
        request = router_pb2.CreateImageRequest(**{"prompt": "ok", **fields})
        assert refused(media.image_request, request, model).param == param, fields


def test_speech_requests_count_code_points(models):
    model = models.get("tts")
    ask = media.speech_request(router_pb2.CreateSpeechRequest(input="naïve 🎉", voice="alloy"), model)
    assert ask.characters == 7 and ask.response_format == "mp3" and ask.content_type == "audio/mpeg"
    assert "speed" not in ask.backend_body()
    for fields, param in (({"input": ""}, "input"), ({"input": "x" * 11}, "input"), ({"voice": "nova"}, "voice"),
                          ({"response_format": "flac"}, "response_format"), ({"speed": 0.2}, "speed"),
                          ({"speed": float("nan")}, "speed"), ({"stream_format": "sse"}, "stream_format")):
        request = router_pb2.CreateSpeechRequest(**{"input": "hi", "voice": "alloy", **fields})
        assert refused(media.speech_request, request, model).param == param, fields


def _form(fields: dict, files: dict | None = None) -> multipart.Form:
    return multipart.Form(fields, files or {})


def test_video_requests(models):
    model = models.get("vid")
    ask = media.video_request(_form({"prompt": "a boat"}), model)
    assert (ask.seconds, ask.size) == (4, "720x1280")
    assert media.video_request(_form({"prompt": "a boat", "seconds": 12}), model).backend_body()["seconds"] == "12"
    for fields, param in (({"prompt": ""}, "prompt"), ({"seconds": "1"}, "seconds"), ({"seconds": "13"}, "seconds"),
                          ({"seconds": "4.5"}, "seconds"), ({"seconds": True}, "seconds"),
                          ({"size": "1280x720"}, "size")):
        assert refused(media.video_request, _form({"prompt": "ok", **fields}), model).param == param, fields
    reference = multipart.Part("input_reference", "a.png", "image/png", memoryview(b"x"))
    assert refused(media.video_request, _form({"prompt": "ok"}, {"input_reference": reference}), model).param \
        == "input_reference"


def test_a_video_is_charged_what_it_produced_never_more_than_asked():
    assert media.produced_ms({"seconds": "4"}, 4) == 4000
    assert media.produced_ms({"seconds": "8"}, 4) == 4000
    assert media.produced_ms({"seconds": "2.5"}, 4) == 2500
    assert media.produced_ms({}, 4) == 4000
    assert media.produced_ms({"seconds": "nan"}, 4) == 4000
    row = {"id": "video_1", "model": "vid", "status": "failed", "progress": 40, "created_at": 1, "completed_at": 2,
           "error": json.dumps({"code": "x", "message": "y"}), "prompt": "p", "seconds": 4, "size": "720x1280"}
    job = media.video_json(row)
    assert job["seconds"] == "4" and job["error"] == {"code": "x", "message": "y"} and job["expires_at"] is None


def test_transcription_requests(models):
    model = models.get("stt")
    wav = multipart.Part("file", "a.wav", "audio/wav", memoryview(b"RIFF...."))
    ask = media.transcription_request(_form({"model": "stt", "language": "en", "response_format": "text",
                                             "timestamp_granularities[]": ["word", "segment"]}, {"file": wav}), model)
    assert ask.response_format == "text" and "model" not in ask.fields and ask.fields["language"] == "en"
    assert refused(media.transcription_request, _form({"model": "stt"}), model).code == "missing_file"
    for fields, param in (({"response_format": "srt"}, "response_format"), ({"language": "EN"}, "language"),
                          ({"temperature": "2"}, "temperature"), ({"temperature": "hot"}, "temperature"),
                          ({"stream": "true"}, "stream")):
        assert refused(media.transcription_request, _form(fields, {"file": wav}), model).param == param, fields
    assert refused(media.check_duration, 99, model).code == "audio_too_short"
    assert refused(media.check_duration, 60_001, model).code == "audio_too_long"
    media.check_duration(60_000, model)


def test_nothing_is_charged_beyond_the_hold():
    held = Held.parse("model=stt,audio_ms=30000")
    assert held == Held("stt", {"audio_ms": 30000})
    media.within_hold(held, "stt", "audio_ms", 30000)
    media.within_hold(None, "stt", "audio_ms", 10**9)  # no hold header (a benchmark of the ledger hop)
    assert refused(media.within_hold, held, "stt", "audio_ms", 30001).code == "audio_exceeds_hold"
    assert refused(media.within_hold, held, "other", "audio_ms", 1).code == "model_after_file"
    assert refused(media.within_hold, Held.parse("model=img,images=2"), "img", "images", 3).code \
        == "exceeds_hold"


def test_the_held_header_is_read_in_one_place_and_never_guessed():
    text = Held.parse("model=ref-chat,input_tokens=120,output_tokens=4096")
    assert text == Held("ref-chat", {"input_tokens": 120, "output_tokens": 4096})
    assert (text.get("output_tokens"), text.get("images")) == (4096, None)
    assert Held.parse(held.encode("m", {"input_tokens": 1, "output_tokens": 2})) == Held(
        "m", {"input_tokens": 1, "output_tokens": 2})
    for broken in ("", "model=x,images=two", "model=x", "images=2", "model=x,images=-1", "model=x,pixels=3",
                   "model=x,images=2,images=3", "model=x,images=2,", "model=x,images=１", "model=x,images=" + "9" * 20):
        assert Held.parse(broken) is None, broken


def test_forms_and_json_bodies():
    body = (b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nstt\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"t[]\"\r\n\r\none\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"t[]\"\r\n\r\ntwo\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a b.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\nRIFF\r\n--bx\r\n--b--\r\n")
    form = media.read_form('multipart/form-data; boundary="b"', body)
    assert form.fields == {"model": "stt", "t[]": ["one", "two"]}
    upload = form.files["file"]
    assert upload.filename == "a b.wav" and bytes(upload.data) == b"RIFF\r\n--bx" and upload.content_type == "audio/wav"
    assert media.read_form("application/json", b'{"model": "vid", "seconds": 8}').fields["seconds"] == 8
    assert media.read_form("application/x-www-form-urlencoded", b"model=vid&prompt=a+b").fields["prompt"] == "a b"
    for content_type, data in (("multipart/form-data; boundary=b", b"--b\r\nno end"), ("application/json", b"[1]"),
                               ("text/plain", b"hi"), ("multipart/form-data", body),
                               ("multipart/form-data; boundary=b", b"--b\r\nContent-Type: x\r\n\r\nv\r\n--b--")):
        assert refused(media.read_form, content_type, data).code == "invalid_body", data


def test_a_prefix_of_a_form():
    body = (b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nstt\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n" + b"a" * 100)
    form = multipart.parse(body, "multipart/form-data; boundary=b", partial=True)
    assert form.truncated and form.text("model") == "stt"
    upload = form.files["file"]
    assert not upload.complete and len(upload.data) == 100 and body[upload.offset:] == b"a" * 100
    cut = multipart.parse(body[:30], "multipart/form-data; boundary=b", partial=True)
    assert cut.truncated and cut.fields == {} and cut.files == {}
    with pytest.raises(multipart.FormError):
        multipart.parse(b"--b\r\n" * (multipart.PARTS_MAX + 2), "multipart/form-data; boundary=b")
