"""router_svc's media paths: build_server on port 0 in front of the real reference backend
(in-process), with its SQL store, the video poller, and a fake ledger_svc that records
settlements (router_rig.py). Images, speech, transcription and video jobs; validation
before any backend call; failover between a model's backends; what each call settles."""
import asyncio
import base64
import io
import json
import subprocess

import grpc
import pytest
import soundfile
from google.api import httpbody_pb2
from PIL import Image

from common import pricing
from router_svc import audio as audio_mod
from tests import audio
from tests.conftest import free_port
from tests.integration import router_rig
from tokens.router.v1 import router_pb2

pytestmark = pytest.mark.timeout(120)

PRICES = {"image": {"per_image": 40_000_000}, "video": {"per_second": 100_000_000},
          "tts": {"per_character": 15_000}, "stt": {"per_minute": 6_000_000}}


def catalog_yaml(urls: list[str]) -> str:
    backends = "".join(f"      - url: {u}/v1\n" for u in urls)
    return f"""models:
  - id: ref-image
    type: image
    backends:
{backends}    limits: {{max_images: 4}}
    options: {{sizes: [256x256, 512x512], default_size: 256x256}}
    pricing: {{per_image: "0.04"}}
  - id: ref-video
    type: video
    backends:
{backends}    limits: {{max_video_seconds: 8}}
    options: {{sizes: [720x1280, 1280x720], min_seconds: 1, default_seconds: 4}}
    pricing: {{per_second: "0.10"}}
  - id: ref-tts
    type: tts
    backends:
{backends}    limits: {{max_input_characters: 64}}
    options: {{voices: [alloy, nova], response_formats: [mp3, wav, flac]}}
    pricing: {{per_character: "0.000015"}}
  - id: ref-stt
    type: stt
    backends:
{backends}    limits: {{max_audio_seconds: 600}}
    pricing: {{per_minute: "0.006"}}
"""


@pytest.fixture
async def router(start_router, reference) -> router_rig.Router:
    return await start_router([reference], catalog_yaml([reference]))


def held(kind: str, held_units: str = "", account: str = "acct_1", hold: str = "hold-1") -> tuple:
    pairs = [("x-ts-hold", hold), ("x-ts-price", pricing.encode_header(PRICES[kind])), ("x-request-id", "req-1"),
             ("x-ts-account", account)]
    if held_units:
        pairs.append(("x-ts-held", held_units))
    return tuple(pairs)


def wav(seconds: float, rate: int = 16_000) -> bytes:
    return audio.sine_wav(seconds, rate, hz=440)


def form(fields: dict, file: tuple[str, bytes, str] | None = None) -> httpbody_pb2.HttpBody:
    boundary = "test-boundary-1234"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if file:
        filename, data, content_type = file
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return httpbody_pb2.HttpBody(content_type=f"multipart/form-data; boundary={boundary}", data=body)


async def refused(call, code=grpc.StatusCode.INVALID_ARGUMENT) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = call
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    assert caught.value.code() == code, caught.value
    return json.loads(caught.value.details())["error"]


# --- images ---------------------------------------------------------------------------

async def test_images_b64_are_pngs_and_charged_per_image(router):
    call = router.stub.CreateImage(router_pb2.CreateImageRequest(model="ref-image", prompt="a red fox", n=2),
                                   metadata=held("image", "model=ref-image,images=2"))
    reply = await call
    assert reply.content_type == "application/json"
    body = json.loads(reply.data)
    assert len(body["data"]) == 2
    for item in body["data"]:
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert image.format == "PNG" and image.size == (256, 256)
    assert dict(await call.initial_metadata())["x-usage-cost-usd"] == "0.08"
    [settlement] = await router.settled()
    assert settlement.outcome == "completed" and settlement.units.images == 2


async def test_image_urls_are_served_by_the_gateway(router):
    reply = await router.stub.CreateImage(router_pb2.CreateImageRequest(
        model="ref-image", prompt="a blue whale", response_format="url", size="512x512"),
        metadata=held("image", "model=ref-image,images=1"))
    [item] = json.loads(reply.data)["data"]
    prefix = "https://api.example.test/v1/images/files/"
    assert item["url"].startswith(prefix) and item["url"].endswith(".png")
    picture = await router.stub.GetImageFile(router_pb2.GetImageFileRequest(file_id=item["url"][len(prefix):]))
    assert picture.content_type == "image/png"
    assert Image.open(io.BytesIO(picture.data)).size == (512, 512)
    error = await refused(router.stub.GetImageFile(router_pb2.GetImageFileRequest(file_id="img_nope.png")),
                          grpc.StatusCode.NOT_FOUND)
    assert error["code"] == "image_not_found"


@pytest.mark.parametrize("fields,param", [
    ({"prompt": ""}, "prompt"), ({"prompt": "   "}, "prompt"), ({"n": 0}, "n"), ({"n": 5}, "n"),
    ({"size": "300x300"}, "size"), ({"response_format": "png"}, "response_format"), ({"style": "wild"}, "style"),
    ({"model": "ref-tts"}, "model")])
async def test_bad_image_requests_are_400_void_and_never_reach_the_backend(router, fields, param):
    request = router_pb2.CreateImageRequest(**{"model": "ref-image", "prompt": "ok", **fields})
    error = await refused(router.stub.CreateImage(request, metadata=held("image", "model=ref-image,images=4")))
    assert error["param"] == param
    [settlement] = await router.settled()
    assert settlement.outcome == "failed"
    assert (await router.stats())["images_generated"] == 0


# --- speech ---------------------------------------------------------------------------

async def test_speech_returns_audio_and_is_charged_per_code_point(router):
    text = "héllo wörld 🎉"  # 13 code points, 18 UTF-8 bytes
    call = router.stub.CreateSpeech(router_pb2.CreateSpeechRequest(model="ref-tts", input=text, voice="nova",
                                                                   response_format="wav"),
                                    metadata=held("tts", "model=ref-tts,characters=13"))
    frames = [f async for f in call]
    assert frames[0].content_type == "audio/wav"
    samples, rate = soundfile.read(io.BytesIO(b"".join(f.data for f in frames)))
    assert rate == 24_000 and len(samples) == 13 * 1440
    assert dict(await call.initial_metadata())["x-usage-cost-usd"] == "0.000195"
    [settlement] = await router.settled()
    assert settlement.outcome == "completed" and settlement.units.characters == 13


@pytest.mark.parametrize("fields,param", [
    ({"input": ""}, "input"), ({"input": "x" * 65}, "input"), ({"voice": "bob"}, "voice"), ({"voice": ""}, "voice"),
    ({"response_format": "ogg"}, "response_format"), ({"speed": 4.5}, "speed"), ({"speed": 0.1}, "speed")])
async def test_bad_speech_requests_are_400_void_and_never_reach_the_backend(router, fields, param):
    request = router_pb2.CreateSpeechRequest(**{"model": "ref-tts", "input": "hi", "voice": "alloy", **fields})
    error = await refused(router.stub.CreateSpeech(request, metadata=held("tts", "model=ref-tts,characters=64")))
    assert error["param"] == param
    [settlement] = await router.settled()
    assert settlement.outcome == "failed"
    assert (await router.stats())["speech_characters"] == 0


# --- transcription --------------------------------------------------------------------

async def test_transcription_is_charged_on_the_gateways_own_decode(router):
    reply = router.stub.CreateTranscription(form({"model": "ref-stt"}, ("half.wav", wav(30), "audio/wav")),
                                            metadata=held("stt", "model=ref-stt,audio_ms=30000"))
    body = json.loads((await reply).data)
    assert body["usage"] == {"type": "duration", "seconds": 30.0}
    assert body["text"].startswith("Audio of 30.000 seconds.")
    assert dict(await reply.initial_metadata())["x-usage-cost-usd"] == "0.003"
    [settlement] = await router.settled()
    assert settlement.outcome == "completed" and settlement.units.audio_ms == 30_000


def _ffmpeg_encode(data: bytes, args: list[str]) -> bytes:
    return subprocess.run([audio_mod.ffmpeg_exe(), "-v", "error", "-i", "pipe:0", *args, "pipe:1"],
                          input=data, capture_output=True, check=True, timeout=60).stdout


@pytest.mark.parametrize("name,encode", [
    ("a.flac", lambda w: _ffmpeg_encode(w, ["-f", "flac"])),
    ("a.mp3", lambda w: _ffmpeg_encode(w, ["-c:a", "libmp3lame", "-b:a", "32k", "-f", "mp3"])),
    ("a.webm", lambda w: _ffmpeg_encode(w, ["-c:a", "libopus", "-b:a", "24k", "-f", "webm"])),
])
async def test_other_containers_decode_here_and_match_the_backend(router, name, encode):
    data = encode(wav(2.5))
    reply = await router.stub.CreateTranscription(form({"model": "ref-stt", "response_format": "verbose_json"},
                                                       (name, data, "application/octet-stream")),
                                                  metadata=held("stt"))
    seconds = json.loads(reply.data)["usage"]["seconds"]
    [settlement] = await router.settled()
    assert settlement.units.audio_ms == round(seconds * 1000)
    assert 2400 <= settlement.units.audio_ms <= 2700


@pytest.mark.parametrize("fields,file,code", [
    ({"model": "ref-stt"}, None, "missing_file"),
    ({"model": "ref-stt"}, ("x.wav", b"this is not audio at all" * 40, "audio/wav"), "invalid_file"),
    ({"model": "ref-stt", "response_format": "docx"}, ("a.wav", wav(1), "audio/wav"), "invalid_value"),
    ({"model": "ref-stt", "language": "English"}, ("a.wav", wav(1), "audio/wav"), "invalid_value"),
    ({"model": "ref-stt"}, ("a.wav", wav(0.05), "audio/wav"), "audio_too_short"),
    ({}, ("a.wav", wav(1), "audio/wav"), "missing_model"),
])
async def test_bad_transcriptions_are_400_void_and_never_reach_the_backend(router, fields, file, code):
    error = await refused(router.stub.CreateTranscription(form(fields, file), metadata=held("stt")))
    assert error["code"] == code
    [settlement] = await router.settled()
    assert settlement.outcome == "failed"
    assert (await router.stats())["transcription_ms"] == 0


async def test_audio_longer_than_its_hold_is_refused(router):
    error = await refused(router.stub.CreateTranscription(form({"model": "ref-stt"}, ("a.wav", wav(3), "audio/wav")),
                                                          metadata=held("stt", "model=ref-stt,audio_ms=2999")))
    assert error["code"] == "audio_exceeds_hold"
    error = await refused(router.stub.CreateTranscription(form({"model": "ref-stt"}, ("a.wav", wav(1), "audio/wav")),
                                                          metadata=held("stt", "model=other-stt,audio_ms=9999")))
    assert error["code"] == "model_after_file"
    assert (await router.stats())["transcription_ms"] == 0


# --- video ----------------------------------------------------------------------------

async def video_until_done(router: router_rig.Router, video_id: str, account: str = "acct_1") -> dict:
    for _ in range(400):
        reply = await router.stub.GetVideo(router_pb2.GetVideoRequest(video_id=video_id),
                                           metadata=(("x-ts-account", account),))
        job = json.loads(reply.data)
        if job["status"] in ("completed", "failed"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError("the video job did not finish")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_video_job_is_charged_the_seconds_produced_once_completed(router):
    created = json.loads((await router.stub.CreateVideo(
        form({"model": "ref-video", "prompt": "a paper boat", "seconds": "2", "size": "1280x720"}),
        metadata=held("video", "model=ref-video,video_ms=2000"))).data)
    assert created["id"].startswith("video_") and created["status"] in ("queued", "in_progress")
    assert created["seconds"] == "2" and created["size"] == "1280x720" and created["object"] == "video"
    assert router.ledger.settled == []  # the hold waits for the job
    for _ in range(100):  # and is claimed at once: it must not lapse as an orphan's would
        if router.ledger.claimed:
            break
        await asyncio.sleep(0.01)
    assert router.ledger.claimed == ["hold-1"]
    error = await refused(router.stub.GetVideo(router_pb2.GetVideoRequest(video_id=created["id"]),
                                               metadata=(("x-ts-account", "acct_2"),)), grpc.StatusCode.NOT_FOUND)
    assert error["code"] == "video_not_found"
    done = await video_until_done(router, created["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"]
    [settlement] = await router.settled()
    assert settlement.outcome == "completed" and settlement.units.video_ms == 2000
    content = [c async for c in router.stub.GetVideoContent(router_pb2.GetVideoContentRequest(
        video_id=created["id"]), metadata=(("x-ts-account", "acct_1"),))]
    assert content[0].content_type == "video/mp4" and b"ftyp" in content[0].data[:16]
    await refused(router.stub.GetVideoContent(router_pb2.GetVideoContentRequest(video_id=created["id"]),
                                              metadata=(("x-ts-account", "acct_2"),)), grpc.StatusCode.NOT_FOUND)
    await asyncio.sleep(0.2)  # more polls and reads never settle twice
    assert len(router.ledger.settled) == 1


async def test_failed_video_job_is_voided_and_json_is_accepted(router):
    body = json.dumps({"model": "ref-video", "prompt": "boom [[fail]]", "seconds": 4}).encode()
    created = json.loads((await router.stub.CreateVideo(
        httpbody_pb2.HttpBody(content_type="application/json", data=body),
        metadata=held("video", "model=ref-video,video_ms=4000"))).data)
    done = await video_until_done(router, created["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "video_generation_failed"
    [settlement] = await router.settled()
    assert settlement.outcome == "failed" and settlement.units.video_ms == 0
    error = await refused(router.stub.GetVideoContent(router_pb2.GetVideoContentRequest(video_id=created["id"]),
                                                      metadata=(("x-ts-account", "acct_1"),)),
                          grpc.StatusCode.NOT_FOUND)
    assert error["code"] == "video_not_ready"


@pytest.mark.parametrize("fields,param", [
    ({"prompt": ""}, "prompt"), ({"seconds": "0"}, "seconds"), ({"seconds": "9"}, "seconds"),
    ({"seconds": "four"}, "seconds"), ({"size": "640x480"}, "size"), ({"model": "ref-image"}, "model")])
async def test_bad_video_requests_are_400_void_and_never_reach_the_backend(router, fields, param):
    error = await refused(router.stub.CreateVideo(form({"model": "ref-video", "prompt": "ok", **fields}),
                                                  metadata=held("video", "model=ref-video,video_ms=8000")))
    assert error["param"] == param
    [settlement] = await router.settled()
    assert settlement.outcome == "failed"
    stats = await router.stats()
    assert stats["videos_completed"] + stats["videos_failed"] == 0


async def test_a_job_past_its_deadline_fails_and_costs_nothing(start_router, reference):
    router = await start_router([reference], catalog_yaml([reference]), video_job_timeout_s=0.0)
    created = json.loads((await router.stub.CreateVideo(form({"model": "ref-video", "prompt": "slow"}),
                                                        metadata=held("video"))).data)
    done = await video_until_done(router, created["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "video_generation_timeout"
    [settlement] = await router.settled()
    assert settlement.outcome == "failed"


# --- several backends -----------------------------------------------------------------

async def test_calls_move_to_a_live_backend_and_fail_503_unpaid_when_none_is_left(start_router, reference):
    dead = f"http://127.0.0.1:{free_port()}"
    router = await start_router([dead, reference], catalog_yaml([dead, reference]))
    for _ in range(2):
        reply = await router.stub.CreateImage(router_pb2.CreateImageRequest(model="ref-image", prompt="p"),
                                              metadata=held("image"))
        assert len(json.loads(reply.data)["data"]) == 1
        audio = [f async for f in router.stub.CreateSpeech(router_pb2.CreateSpeechRequest(
            model="ref-tts", input="hi", voice="alloy"), metadata=held("tts"))]
        assert audio[0].content_type == "audio/mpeg"
        await router.stub.CreateTranscription(form({"model": "ref-stt"}, ("a.wav", wav(1), "audio/wav")),
                                              metadata=held("stt"))
    settlements = await router.settled(6)
    assert all(s.outcome == "completed" for s in settlements)
    router.ledger.settled.clear()
    unreachable = [dead, f"http://127.0.0.1:{free_port()}"]
    nowhere = await start_router(unreachable, catalog_yaml(unreachable))
    error = await refused(nowhere.stub.CreateImage(router_pb2.CreateImageRequest(model="ref-image", prompt="p"),
                                                   metadata=held("image")), grpc.StatusCode.UNAVAILABLE)
    assert error["type"] == "server_error"
    await refused(nowhere.stub.CreateVideo(form({"model": "ref-video", "prompt": "p"}), metadata=held("video")),
                  grpc.StatusCode.UNAVAILABLE)
    settlements = await nowhere.settled(2)
    assert [s.outcome for s in settlements] == ["failed", "failed"]
