"""The media routes of the reference backend on port 0, driven with the openai client and httpx."""

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import tempfile

import httpx
import openai
import pytest
import soundfile
from PIL import Image

from backends.reference import config, media, speech
from tests import audio
from tests.integration.conftest import serve_reference

# The SDK marks the Sora methods deprecated; these tests call them on purpose.
SORA_DEPRECATED = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


async def _stats(http: httpx.AsyncClient) -> dict:
    return (await http.get("/_stats")).json()


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def _wav(seconds: float, rate: int = 16_000, gain: float = 0.3) -> bytes:
    return audio.sine_wav(seconds, rate, hz=220, gain=gain)


def _mp4_frames(data: bytes) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.mp4")
        with open(path, "wb") as out:
            out.write(data)
        done = subprocess.run([media.ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", path,
                               "-f", "null", "-"], capture_output=True, check=True, timeout=60)
    return int(re.findall(rb"frame=\s*(\d+)", done.stderr)[-1])


def _assert_openai_error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


async def test_models_list_the_media_models_too(oai):
    ids = [model.id for model in (await oai.models.list()).data]
    assert {"ref-chat", "ref-image", "ref-video", "ref-tts", "ref-stt"} <= set(ids)


# ---- images -------------------------------------------------------------------------


async def test_images_as_b64_json_are_pngs_of_the_size_asked(oai, http):
    result = await oai.images.generate(model="ref-image", prompt="a red barn", n=2,
                                       size="256x256", response_format="b64_json")
    assert result.created > 0 and result.usage is None and len(result.data) == 2
    pictures = [_png(base64.b64decode(item.b64_json)) for item in result.data]
    assert all(p.size == (256, 256) for p in pictures)
    assert pictures[0].tobytes() != pictures[1].tobytes()
    again = await oai.images.generate(model="ref-image", prompt="a red barn", n=2,
                                      size="256x256", response_format="b64_json")
    assert [i.b64_json for i in again.data] == [i.b64_json for i in result.data]
    default = await oai.images.generate(model="ref-image", prompt="a red barn")
    assert len(default.data) == 1 and _png(base64.b64decode(default.data[0].b64_json)).size == (
        1024, 1024)
    assert (await _stats(http))["images_generated"] == 2 + 2 + 1


async def test_images_as_urls_are_served_by_this_server(oai, http, base_url):
    result = await oai.images.generate(model="ref-image", prompt="a lake", n=2, size="1792x1024",
                                       response_format="url")
    urls = [item.url for item in result.data]
    assert all(url.startswith(f"{base_url}/v1/files/images/") for url in urls)
    assert len(set(urls)) == 2
    for url in urls:
        response = await http.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert _png(response.content).size == (1792, 1024)
    missing = await http.get("/v1/files/images/nope.png")
    assert _assert_openai_error(missing, 404)["code"] == "image_not_found"


async def test_image_urls_need_no_key_when_the_api_needs_one():
    async with serve_reference(config.Settings(port=0, api_key="sk-right")) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-right",
                                      max_retries=0) as good, httpx.AsyncClient() as anonymous:
            result = await good.images.generate(prompt="a hill", size="256x256",
                                                response_format="url")
            response = await anonymous.get(result.data[0].url)
            assert response.status_code == 200 and _png(response.content).size == (256, 256)
            denied = await anonymous.post(f"{url}/v1/images/generations", json={"prompt": "x"})
            assert denied.status_code == 401


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "ref-image", "prompt": ""}, "prompt"),
    ({"model": "ref-image"}, "prompt"),
    ({"model": "ref-image", "prompt": "p", "n": 0}, "n"),
    ({"model": "ref-image", "prompt": "p", "n": 11}, "n"),
    ({"model": "ref-image", "prompt": "p", "size": "100x100"}, "size"),
    ({"model": "ref-image", "prompt": "p", "response_format": "jpeg"}, "response_format"),
])
async def test_bad_image_requests_are_400s(http, body, param):
    error = _assert_openai_error(await http.post("/v1/images/generations", json=body))
    assert error["type"] == "invalid_request_error" and error["param"] == param


async def test_openai_client_sees_a_bad_request_for_images(oai):
    with pytest.raises(openai.BadRequestError):
        await oai.images.generate(model="ref-image", prompt="p", n=11)


# ---- speech -------------------------------------------------------------------------


SPEECH_TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.mark.parametrize(("response_format", "content_type"), [
    ("mp3", "audio/mpeg"), ("wav", "audio/wav"), ("flac", "audio/flac"), ("opus", "audio/opus"),
    ("aac", "audio/aac"), ("pcm", "audio/pcm")])
async def test_speech_in_every_format_decodes_to_the_rule(oai, http, response_format,
                                                          content_type):
    result = await oai.audio.speech.create(model="tts-1", voice="coral", input=SPEECH_TEXT,
                                           response_format=response_format, speed=1.5)
    assert result.response.headers["content-type"] == content_type
    expected = speech.sample_count(len(SPEECH_TEXT), 1.5)
    if response_format == "pcm":
        frames = len(result.content) // 2
    elif response_format == "aac":
        frames = audio.ffmpeg_frames(result.content, "aac")
        assert expected <= frames <= expected + 2048  # AAC priming and padding
        frames = expected
    else:
        samples, rate = soundfile.read(io.BytesIO(result.content))
        assert rate == 24_000 and samples.ndim == 1
        frames = len(samples)
    assert frames == expected
    assert (await _stats(http))["speech_characters"] == len(SPEECH_TEXT)


async def test_speech_defaults_to_mp3_and_is_deterministic(oai):
    first = await oai.audio.speech.create(model="tts-1", voice="alloy", input="Hi there.")
    again = await oai.audio.speech.create(model="tts-1", voice="alloy", input="Hi there.")
    assert first.response.headers["content-type"] == "audio/mpeg"
    assert first.content == again.content
    assert soundfile.info(io.BytesIO(first.content)).format == "MP3"


@pytest.mark.parametrize(("change", "param"), [
    ({"input": ""}, "input"),
    ({"input": "x" * 4097}, "input"),
    ({"voice": "robot"}, "voice"),
    ({"response_format": "ogg"}, "response_format"),
    ({"speed": 0.1}, "speed"),
    ({"speed": 5}, "speed"),
])
async def test_bad_speech_requests_are_400s(http, change, param):
    body = {"model": "tts-1", "input": "hello", "voice": "alloy", **change}
    error = _assert_openai_error(await http.post("/v1/audio/speech", json=body))
    assert error["param"] == param
    assert (await _stats(http))["speech_characters"] == 0


async def test_json_bodies_over_1_mib_are_413s(http):
    body = {"model": "tts-1", "input": "x" * (1100 * 1024), "voice": "alloy"}
    assert _assert_openai_error(await http.post("/v1/audio/speech", json=body), 413)
    form = {"model": "sora-2", "prompt": "x" * (1100 * 1024)}
    response = await http.post("/v1/videos", data=form, files={"x": ("x", b"x")})
    assert _assert_openai_error(response, 413)["code"] == "request_too_large"


# ---- transcription ------------------------------------------------------------------


async def test_transcription_of_a_30_s_wav_reports_30_s(oai, http):
    result = await oai.audio.transcriptions.create(model="whisper-1",
                                                   file=("talk.wav", _wav(30.0), "audio/wav"))
    assert result.usage.type == "duration" and result.usage.seconds == 30.0
    assert result.text.startswith("Audio of 30.000 seconds.")
    assert (await _stats(http))["transcription_ms"] == 30_000


async def test_transcription_formats_through_the_openai_client(oai):
    audio = ("talk.wav", _wav(45.5), "audio/wav")
    verbose = await oai.audio.transcriptions.create(
        model="whisper-1", file=audio, response_format="verbose_json", language="en",
        timestamp_granularities=["word", "segment"], temperature=0.2, prompt="names: Ann")
    assert verbose.duration == 45.5 and verbose.language == "english"
    assert [(s.start, s.end) for s in verbose.segments] == [(0, 30), (30, 45.5)]
    assert verbose.words[-1].end == 45.5 and verbose.usage.seconds == 45.5
    text = await oai.audio.transcriptions.create(model="whisper-1", file=audio,
                                                 response_format="text")
    assert text.strip() == verbose.text
    srt = await oai.audio.transcriptions.create(model="whisper-1", file=audio,
                                                response_format="srt")
    assert "2\n00:00:30,000 --> 00:00:45,500\n" in srt
    vtt = await oai.audio.transcriptions.create(model="whisper-1", file=audio,
                                                response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:30.000\n")


async def test_transcription_of_an_m4a_goes_through_ffmpeg(oai):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "talk.m4a")
        subprocess.run([media.ffmpeg_exe(), "-nostdin", "-v", "error", "-f", "wav", "-i",
                        "pipe:0", "-c:a", "aac", path], input=_wav(10.0, 48_000), check=True,
                       timeout=60)
        with open(path, "rb") as made:
            m4a = made.read()
    result = await oai.audio.transcriptions.create(model="whisper-1",
                                                   file=("talk.m4a", m4a, "audio/mp4"))
    assert abs(result.usage.seconds - 10.0) <= 1024 / 48_000


@pytest.mark.parametrize(("files", "data", "param", "code"), [
    (None, {"model": "whisper-1"}, "file", None),
    ({"file": ("a.wav", b"this is not audio" * 100, "audio/wav")}, {"model": "whisper-1"},
     "file", "invalid_file"),
    ({"file": ("a.bin", bytes(4096), "application/octet-stream")}, {"model": "whisper-1"},
     "file", "invalid_file"),
    ({"file": ("a.wav", _wav(1.0), "audio/wav")}, {}, "model", None),
    ({"file": ("a.wav", _wav(1.0), "audio/wav")}, {"model": "whisper-1",
                                                   "response_format": "xml"},
     "response_format", "invalid_value"),
    ({"file": ("a.wav", _wav(0.05), "audio/wav")}, {"model": "whisper-1"}, "file",
     "audio_too_short"),
])
async def test_bad_transcription_requests_are_400s(http, files, data, param, code):
    if files is None:  # still multipart: a form with no file in it
        files = {"other": ("x.txt", b"x", "text/plain")}
    response = await http.post("/v1/audio/transcriptions", files=files, data=data)
    error = _assert_openai_error(response)
    assert (error["param"], error["code"]) == (param, code)
    assert (await _stats(http))["transcription_ms"] == 0


async def test_transcription_needs_a_multipart_body(http):
    response = await http.post("/v1/audio/transcriptions", json={"model": "whisper-1"})
    _assert_openai_error(response)


async def test_openai_client_sees_a_bad_request_for_an_undecodable_file(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.audio.transcriptions.create(model="whisper-1",
                                              file=("a.mp3", os.urandom(50_000), "audio/mpeg"))
    assert caught.value.code == "invalid_file"


async def test_uploads_over_25_mb_are_413s(http, oai):
    big = bytes(26 * 1000 * 1000)
    response = await http.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                               files={"file": ("big.wav", big, "audio/wav")})
    assert _assert_openai_error(response, 413)["code"] == "file_too_large"
    bigger = bytes(30 * 1000 * 1000)  # the body alone is past the bound
    response = await http.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                               files={"file": ("big.wav", bigger, "audio/wav")})
    assert _assert_openai_error(response, 413)["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as caught:
        await oai.audio.transcriptions.create(model="whisper-1",
                                              file=("big.wav", big, "audio/wav"))
    assert caught.value.status_code == 413
    # 25 MB exactly is allowed through to the decoder (which finds no audio in zeros).
    response = await http.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                               files={"file": ("big.wav", bytes(25_000_000), "audio/wav")})
    assert _assert_openai_error(response, 400)["code"] == "invalid_file"
    assert (await http.get("/health")).status_code == 200


# ---- video --------------------------------------------------------------------------


async def _wait_for_video(http: httpx.AsyncClient, video_id: str) -> dict:
    for _ in range(300):  # 30 s at most
        job = (await http.get(f"/v1/videos/{video_id}")).json()
        if job["status"] in ("completed", "failed"):
            return job
        assert job["status"] in ("queued", "in_progress")
        await asyncio.sleep(0.1)
    raise AssertionError("the video job did not finish")


@SORA_DEPRECATED
async def test_video_job_through_the_openai_client(oai, http):
    assert hasattr(oai, "videos")
    job = await oai.videos.create(model="sora-2", prompt="a paper boat", seconds="4",
                                  size="1280x720")
    assert job.id.startswith("video_") and job.object == "video"
    assert (job.status, job.progress, job.seconds, job.size) == ("queued", 0, "4", "1280x720")
    done = await oai.videos.poll(job.id, poll_interval_ms=50)
    assert done.status == "completed" and done.progress == 100 and done.completed_at
    content = await oai.videos.download_content(job.id)
    assert content.response.headers["content-type"] == "video/mp4"
    assert _mp4_frames(content.content) == 4 * 24
    stats = await _stats(http)
    assert (stats["videos_completed"], stats["video_seconds_produced"],
            stats["videos_failed"]) == (1, 4, 0)


async def test_video_job_as_json_with_whole_seconds(http):
    created = await http.post("/v1/videos", json={"model": "sora-2", "prompt": "rain",
                                                  "seconds": 7})
    assert created.status_code == 200
    job = created.json()
    assert (job["seconds"], job["size"], job["status"]) == ("7", "720x1280", "queued")
    early = await http.get(f"/v1/videos/{job['id']}/content")
    if early.status_code != 200:  # it may already be done on a fast machine
        assert _assert_openai_error(early, 404)["code"] == "video_not_ready"
    done = await _wait_for_video(http, job["id"])
    assert done["status"] == "completed" and done["error"] is None
    content = await http.get(f"/v1/videos/{job['id']}/content")
    assert content.headers["content-type"] == "video/mp4"
    assert _mp4_frames(content.content) == 7 * 24
    assert (await _stats(http))["video_seconds_produced"] == 7


@SORA_DEPRECATED
async def test_a_fail_prompt_ends_failed_and_counts_nothing_produced(oai, http):
    job = await oai.videos.create(model="sora-2", prompt="[[fail]] a storm", seconds="8")
    done = await oai.videos.poll(job.id, poll_interval_ms=50)
    assert done.status == "failed" and done.error.code == "video_generation_failed"
    with pytest.raises(openai.NotFoundError):
        await oai.videos.download_content(job.id)
    stats = await _stats(http)
    assert (stats["videos_failed"], stats["videos_completed"],
            stats["video_seconds_produced"]) == (1, 0, 0)


async def test_unknown_video_ids_are_404s(http):
    for path in ("/v1/videos/video_nope", "/v1/videos/video_nope/content"):
        assert _assert_openai_error(await http.get(path), 404)["code"] == "video_not_found"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "sora-2", "prompt": ""}, "prompt"),
    ({"model": "sora-2", "prompt": "p", "seconds": 0}, "seconds"),
    ({"model": "sora-2", "prompt": "p", "seconds": 21}, "seconds"),
    ({"model": "sora-2", "prompt": "p", "seconds": "5.5"}, "seconds"),
    ({"model": "sora-2", "prompt": "p", "size": "640x480"}, "size"),
])
async def test_bad_video_requests_are_400s_as_json_and_as_forms(http, body, param):
    as_json = await http.post("/v1/videos", json=body)
    assert _assert_openai_error(as_json)["param"] == param
    form = {k: str(v) for k, v in body.items()}
    as_form = await http.post("/v1/videos", data=form, files={"unused": ("x", b"x")})
    assert _assert_openai_error(as_form)["param"] == param


async def test_invalid_json_is_a_400_on_media_routes(http):
    for path in ("/v1/images/generations", "/v1/audio/speech", "/v1/videos"):
        response = await http.post(path, content=b"{nope",
                                   headers={"Content-Type": "application/json"})
        _assert_openai_error(response)
    assert json.loads((await http.get("/_stats")).text)["images_generated"] == 0
