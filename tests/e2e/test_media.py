"""Media end to end: the real Envoy and every service, driven with the official openai client.

A mesh of its own, whose catalog (TOKENS_CATALOG) lists two reference backends for each media
model: the mesh's own and a second one this module starts. Each modality's output is real
media (PNG decoded by Pillow, audio by libsndfile, MP4 by the ffmpeg binary) and the balance
moves by exactly units x price. The last test kills the backends one after the other.
"""
import base64
import contextlib
import dataclasses
import decimal
import io
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import httpx
import imageio_ffmpeg
import openai
import pytest
import soundfile
import yaml
from PIL import Image

from devtool import admin as admin_cli, up
from tests import audio
from tests.e2e.conftest import assert_openai_error, mesh_config, signup

pytestmark = [pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]

ROOT = pathlib.Path(__file__).resolve().parents[2]
MEDIA_MODELS = ("ref-image", "ref-video", "ref-tts", "ref-stt")
PRICES = {"ref-image": decimal.Decimal("0.04"), "ref-video": decimal.Decimal("0.10"),
          "ref-tts": decimal.Decimal("0.000015"), "ref-stt": decimal.Decimal("0.006")}


@dataclasses.dataclass
class MediaMesh:
    mesh: up.Mesh
    second: subprocess.Popen
    second_port: int

    @property
    def base_url(self) -> str:
        return self.mesh.config.base_url

    def stats(self, port: int) -> dict:
        return httpx.get(f"http://127.0.0.1:{port}/_stats", timeout=5).json()

    def produced(self) -> dict:
        """What both backends made, summed."""
        out: dict = {}
        for port in (self.mesh.config.backend_port, self.second_port):
            with contextlib.suppress(httpx.HTTPError):
                for key, value in self.stats(port).items():
                    out[key] = out.get(key, 0) + value
        return out


def _catalog(path: pathlib.Path, urls: list[str]) -> None:
    """The repository's catalog, each media model served by every one of `urls`."""
    raw = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    for entry in raw["models"]:
        if entry["id"] in MEDIA_MODELS:
            entry["backends"] = [{"url": f"{u}/v1"} for u in urls]
    path.write_text(yaml.safe_dump(raw))


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"the second reference backend did not start on {port}")


@pytest.fixture(scope="module")
def media_mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("media-mesh")
    config = mesh_config(tmp)
    [second_port] = up.free_ports(1)
    catalog_path = tmp / "catalog.yaml"
    _catalog(catalog_path, [f"http://127.0.0.1:{config.backend_port}", f"http://127.0.0.1:{second_port}"])
    config = dataclasses.replace(config, extra_env={**config.extra_env, "TOKENS_CATALOG": str(catalog_path),
                                                    "TOKENS_PUBLIC_BASE_URL": config.base_url,
                                                    "TOKENS_VIDEO_POLL_S": "0.2"})
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENS_BACKEND_PORT=str(second_port))
    with open(tmp / "second-reference.log", "wb") as log:
        second = subprocess.Popen([sys.executable, "-m", "backends.reference"], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    mesh = up.Mesh(config)
    try:
        _wait_port(second_port)
        mesh.start()
        yield MediaMesh(mesh, second, second_port)
    finally:
        mesh.stop()
        if second.poll() is None:
            second.terminate()
            second.wait(10)


@dataclasses.dataclass
class Payer:
    """A customer on the Paid tier (video polling alone would use up the Free tier's 10 a minute)."""
    base_url: str
    account_id: str
    api_key: str

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, timeout=60)

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}

    def balance(self) -> decimal.Decimal:
        reply = httpx.get(f"{self.base_url}/v1/account", headers=self.auth, timeout=10)
        assert reply.status_code == 200, reply.text
        return decimal.Decimal(reply.json()["balance_usd"])

    def balance_becomes(self, expected: decimal.Decimal, timeout_s: float = 20) -> None:
        """Settlement is asynchronous (a batch, or the outbox for video): wait for it, then hold still."""
        deadline = time.monotonic() + timeout_s
        while (current := self.balance()) != expected:
            assert time.monotonic() < deadline, f"balance {current}, expected {expected}"
            time.sleep(0.1)
        time.sleep(0.3)
        assert self.balance() == expected


def _admin(mesh: up.Mesh, *argv: str) -> None:
    previous = os.environ.get("TOKENS_DATA_DIR")
    os.environ["TOKENS_DATA_DIR"] = str(mesh.config.data_dir)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            admin_cli.main(list(argv))
    finally:
        if previous is None:
            os.environ.pop("TOKENS_DATA_DIR", None)
        else:
            os.environ["TOKENS_DATA_DIR"] = previous


@pytest.fixture
def payer(media_mesh) -> Payer:
    customer = signup(media_mesh.base_url)
    _admin(media_mesh.mesh, "account-tier", customer.account_id, "paid")
    return Payer(media_mesh.base_url, customer.account_id, customer.api_key)


def wav(seconds: float, rate: int = 16_000) -> bytes:
    return audio.sine_wav(seconds, rate, hz=330)


# --- images ---------------------------------------------------------------------------

def test_two_images_are_two_pngs_and_cost_two_images(media_mesh, payer):
    start = payer.balance()
    assert start == decimal.Decimal("10.00")
    reply = payer.client.images.generate(model="ref-image", prompt="a lighthouse at dawn", n=2, size="256x256")
    assert len(reply.data) == 2
    for item in reply.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        image.load()
        assert image.format == "PNG" and image.size == (256, 256)
    payer.balance_becomes(start - 2 * PRICES["ref-image"])


def test_image_urls_are_served_through_the_gateway(media_mesh, payer):
    start = payer.balance()
    reply = payer.client.images.generate(model="ref-image", prompt="a harbour", response_format="url",
                                         size="512x512")
    url = reply.data[0].url
    assert url.startswith(f"{media_mesh.base_url}/v1/images/files/img_")
    for port in (media_mesh.mesh.config.backend_port, media_mesh.second_port):
        assert f":{port}" not in url
    fetched = httpx.get(url, timeout=10)  # like OpenAI's signed URLs: no key needed
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (512, 512)
    assert_openai_error(httpx.get(f"{media_mesh.base_url}/v1/images/files/img_{'0' * 32}.png"), 404,
                        "image_not_found")
    payer.balance_becomes(start - PRICES["ref-image"])


# --- speech ---------------------------------------------------------------------------

def test_speech_is_audio_and_costs_its_characters(media_mesh, payer):
    start = payer.balance()
    reply = payer.client.audio.speech.create(model="ref-tts", voice="alloy", input="hello world",
                                             response_format="wav")
    assert reply.response.headers["content-type"] == "audio/wav"
    samples, rate = soundfile.read(io.BytesIO(reply.content))
    assert rate == 24_000 and len(samples) == 11 * 1440  # 60 ms a character
    payer.balance_becomes(start - 11 * PRICES["ref-tts"])
    mp3 = payer.client.audio.speech.create(model="ref-tts", voice="nova", input="héllo 🎉")
    assert mp3.response.headers["content-type"] == "audio/mpeg"
    assert soundfile.info(io.BytesIO(mp3.content)).frames == 7 * 1440  # 7 code points
    payer.balance_becomes(start - 18 * PRICES["ref-tts"])


# --- transcription --------------------------------------------------------------------

def test_thirty_seconds_of_audio_cost_half_a_minute(media_mesh, payer):
    start = payer.balance()
    reply = payer.client.audio.transcriptions.create(model="ref-stt", file=("speech.wav", wav(30), "audio/wav"))
    assert reply.text.startswith("Audio of 30.000 seconds.")
    payer.balance_becomes(start - PRICES["ref-stt"] / 2)


def test_compressed_audio_is_charged_on_its_decoded_duration(media_mesh, payer):
    start = payer.balance()
    with tempfile.TemporaryDirectory() as folder:
        source, target = pathlib.Path(folder, "a.wav"), pathlib.Path(folder, "a.m4a")
        source.write_bytes(wav(12))
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(source), "-c:a", "aac",
                        "-b:a", "48k", str(target)], check=True, timeout=60)
        data = target.read_bytes()
    reply = payer.client.audio.transcriptions.create(model="ref-stt", file=("a.m4a", data, "audio/mp4"),
                                                     response_format="verbose_json")
    seconds = decimal.Decimal(str(reply.duration))
    assert 11.9 < seconds < 12.2
    minutes = (seconds * 1000).quantize(decimal.Decimal(1), decimal.ROUND_HALF_UP) / 60_000
    charge = (minutes * PRICES["ref-stt"]).quantize(decimal.Decimal("1e-9"), decimal.ROUND_HALF_UP)
    payer.balance_becomes(start - charge)


# --- video ----------------------------------------------------------------------------

def test_four_seconds_of_video_cost_four_seconds_and_a_failed_job_nothing(media_mesh, payer):
    start = payer.balance()
    client = payer.client
    job = client.videos.create(model="ref-video", prompt="a paper boat on a pond", seconds="4", size="1280x720")
    assert job.status in ("queued", "in_progress") and job.id.startswith("video_")
    stranger = signup(media_mesh.base_url)
    assert_openai_error(httpx.get(f"{media_mesh.base_url}/v1/videos/{job.id}",
                                  headers={"Authorization": f"Bearer {stranger.api_key}"}), 404, "video_not_found")
    deadline = time.monotonic() + 60
    while job.status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
        job = client.videos.retrieve(job.id)
    assert job.status == "completed" and job.progress == 100 and job.seconds == "4"
    content = client.videos.download_content(job.id)
    assert content.response.headers["content-type"] == "video/mp4"
    with tempfile.NamedTemporaryFile(suffix=".mp4") as clip:
        clip.write(content.content)
        clip.flush()
        frames, seconds = imageio_ffmpeg.count_frames_and_secs(clip.name)
    assert frames == 96 and abs(seconds - 4) < 0.05  # 24 fps
    payer.balance_becomes(start - 4 * PRICES["ref-video"])
    failed = client.videos.create(model="ref-video", prompt="this one breaks [[fail]]", seconds="8")
    while failed.status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
        failed = client.videos.retrieve(failed.id)
    assert failed.status == "failed" and failed.error.code == "video_generation_failed"
    assert_openai_error(httpx.get(f"{media_mesh.base_url}/v1/videos/{failed.id}/content", headers=payer.auth), 404,
                        "video_not_ready")
    time.sleep(1.5)  # the void travels through the outbox like any settlement
    payer.balance_becomes(start - 4 * PRICES["ref-video"])


# --- bad input ------------------------------------------------------------------------

def test_bad_input_is_an_openai_error_costs_nothing_and_reaches_no_backend(media_mesh, payer):
    start, before = payer.balance(), media_mesh.produced()
    base, auth = media_mesh.base_url, payer.auth
    for body, param in (({"model": "ref-image", "prompt": ""}, "prompt"),
                        ({"model": "ref-image", "prompt": "x", "n": 11}, "n"),
                        ({"model": "ref-image", "prompt": "x", "size": "300x300"}, "size")):
        error = assert_openai_error(httpx.post(f"{base}/v1/images/generations", headers=auth, json=body), 400)
        assert error["param"] == param
    for body, param in (({"model": "ref-tts", "input": "", "voice": "alloy"}, "input"),
                        ({"model": "ref-tts", "input": "hi", "voice": "robot"}, "voice"),
                        ({"model": "ref-tts", "input": "hi", "voice": "alloy", "response_format": "ogg"},
                         "response_format")):
        error = assert_openai_error(httpx.post(f"{base}/v1/audio/speech", headers=auth, json=body), 400)
        assert error["param"] == param
    for fields, param in (({"model": "ref-video", "prompt": "x", "seconds": "0"}, "seconds"),
                          ({"model": "ref-video", "prompt": "x", "seconds": "21"}, "seconds"),
                          ({"model": "ref-video", "prompt": ""}, "prompt")):
        error = assert_openai_error(httpx.post(f"{base}/v1/videos", headers=auth, data=fields), 400)
        assert error["param"] == param
    error = assert_openai_error(httpx.post(f"{base}/v1/audio/transcriptions", headers=auth,
                                           data={"model": "ref-stt"}, files={"other": ("a.txt", b"x")}), 400)
    assert error["code"] == "missing_file"
    error = assert_openai_error(httpx.post(f"{base}/v1/audio/transcriptions", headers=auth, data={"model": "ref-stt"},
                                           files={"file": ("a.wav", b"not audio" * 100, "audio/wav")}), 400)
    assert error["code"] == "invalid_file"
    with pytest.raises(openai.BadRequestError):
        payer.client.audio.transcriptions.create(model="ref-stt", file=("a.wav", wav(1)), response_format="docx")
    # Over 25 MB: the ledger filter sees the size in the first 64 KiB (413); far over, Envoy refuses the body.
    big = httpx.post(f"{base}/v1/audio/transcriptions", headers=auth, data={"model": "ref-stt"},
                     files={"file": ("big.mp3", bytes(25_000_001), "audio/mpeg")}, timeout=60)
    assert assert_openai_error(big, 413)["code"] == "file_too_large"
    huge = httpx.post(f"{base}/v1/audio/transcriptions", headers=auth, data={"model": "ref-stt"},
                      files={"file": ("huge.mp3", bytes(27_000_000), "audio/mpeg")}, timeout=60)
    assert_openai_error(huge, 413)
    time.sleep(1)
    assert payer.balance() == start
    after = media_mesh.produced()
    for key in ("images_generated", "speech_characters", "transcription_ms", "videos_completed", "videos_failed"):
        assert after[key] == before[key], key


def test_a_25_mb_upload_passes_byte_exact(media_mesh, payer):
    """The largest upload reaches the router and the backend whole (raised gRPC limits on the path)."""
    rate = 48_000
    seconds = (25_000_000 - 44) // (rate * 2)  # 16-bit mono WAV just under 25 MB: ~260 s
    start = payer.balance()
    reply = payer.client.audio.transcriptions.create(model="ref-stt", file=("long.wav", wav(seconds, rate)),
                                                     response_format="verbose_json", timeout=120)
    assert reply.duration == seconds
    payer.balance_becomes(start - (decimal.Decimal(seconds) / 60 * PRICES["ref-stt"]).quantize(
        decimal.Decimal("1e-9"), decimal.ROUND_HALF_UP))


# --- backends going away (last: it stops them) -----------------------------------------

def test_calls_move_to_the_other_backend_then_fail_503_unpaid(media_mesh, payer):
    client = payer.client
    media_mesh.second.kill()
    media_mesh.second.wait(10)
    start = payer.balance()
    for _ in range(3):  # rotation would send one in two to the dead backend
        assert len(client.images.generate(model="ref-image", prompt="still here", size="256x256").data) == 1
        assert client.audio.speech.create(model="ref-tts", voice="alloy", input="still here").content
        assert client.audio.transcriptions.create(model="ref-stt", file=("a.wav", wav(6))).text
    payer.balance_becomes(start - 3 * (PRICES["ref-image"] + 10 * PRICES["ref-tts"] + PRICES["ref-stt"] / 10))
    media_mesh.mesh.stop_one("reference")
    start = payer.balance()
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(model="ref-image", prompt="nobody home", size="256x256")
    assert caught.value.status_code == 503
    for call in (lambda: client.audio.speech.create(model="ref-tts", voice="alloy", input="nobody"),
                 lambda: client.audio.transcriptions.create(model="ref-stt", file=("a.wav", wav(1))),
                 lambda: client.videos.create(model="ref-video", prompt="nobody", seconds="4")):
        with pytest.raises(openai.InternalServerError) as caught:
            call()
        assert caught.value.status_code == 503
    time.sleep(1.5)
    assert payer.balance() == start
