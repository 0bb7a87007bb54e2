"""Deterministic MP4 clips for the reference backend, and the in-memory jobs of OpenAI's video API.

A clip is H.264 (yuv420p) in MP4 at 24 fps with exactly seconds * 24 frames, so its duration
is exactly the seconds asked for; it has no audio track. Frames are a moving colour gradient
with a bouncing square, made with numpy from a digest of (model, prompt) and encoded by the
imageio-ffmpeg binary. To keep rendering cheap the pixels are 1/8 of the requested size
(720x1280 -> 90x160, 1792x1024 -> 224x128); the job object reports the requested size.

A prompt containing "[[fail]]" makes the job fail once it starts rendering.
"""

import asyncio
import dataclasses
import hashlib
import itertools
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Mapping

import numpy as np

from backends.reference import media

SIZES = {"720x1280": (720, 1280), "1280x720": (1280, 720), "1024x1792": (1024, 1792),
         "1792x1024": (1792, 1024)}
SIZE_DEFAULT = "720x1280"
SECONDS_DEFAULT = 4
SECONDS_MIN, SECONDS_MAX = 1, 20
FPS = 24
SCALE = 8
PROMPT_CHARS_MAX = 32_000
MODEL_DEFAULT = "ref-video"
FAIL_MARK = "[[fail]]"
JOBS_MAX = 128  # jobs kept; finished ones go oldest first to make room
PENDING_MAX = 32  # queued or rendering at once; more is a 429
RENDERS_MAX = 2  # ffmpeg processes at once
RENDER_TIMEOUT_S = 120
_CHUNK_FRAMES = FPS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class VideoRequest:
    model: str
    prompt: str
    seconds: int
    size: str


class RenderError(Exception):
    """A render that did not produce a clip; `code` goes into the job's error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse(fields: Mapping) -> VideoRequest:
    """The validated request from JSON or form fields; raises media.Invalid."""
    model = media.string(fields, "model", 256, MODEL_DEFAULT)
    prompt = media.string(fields, "prompt", PROMPT_CHARS_MAX)
    # OpenAI takes the strings "4", "8" and "12"; any whole number 1..20 works here.
    seconds = media.integer(fields, "seconds", SECONDS_MIN, SECONDS_MAX, SECONDS_DEFAULT)
    size = media.choice(fields, "size", SIZES, SIZE_DEFAULT)
    return VideoRequest(model, prompt, seconds, size)


def frame_size(size: str) -> tuple[int, int]:
    """(width, height) of the encoded pixels: 1/8 of the requested size, both even for yuv420p."""
    width, height = SIZES[size]
    return width // SCALE // 2 * 2, height // SCALE // 2 * 2


def frame_count(seconds: int) -> int:
    return seconds * FPS


def frames(request: VideoRequest, start: int, count: int) -> bytes:
    """Frames start..start+count-1 as packed rgb24."""
    width, height = frame_size(request.size)
    key = f"{request.model}\x00{request.prompt}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(key, digest_size=16).digest()
    t = np.arange(start, start + count, dtype=np.int32)[:, None, None]
    y = np.arange(height, dtype=np.int32)[None, :, None]
    x = np.arange(width, dtype=np.int32)[None, None, :]
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    out[..., 0] = (x * 255 // width + t * (1 + digest[0] % 5) + digest[1]) % 256
    out[..., 1] = (y * 255 // height + t * (1 + digest[2] % 3) + digest[3]) % 256
    out[..., 2] = (digest[4] + (x + y) // 2 + t) % 256
    side = max(4, min(width, height) // 4)
    for i, frame in enumerate(t[:, 0, 0]):  # bounded by count
        left = _bounce(int(frame) * (2 + digest[5] % 3), width - side)
        top = _bounce(int(frame) * (1 + digest[6] % 3), height - side)
        out[i, top:top + side, left:left + side] = 255
    return out.tobytes()


def _bounce(position: int, span: int) -> int:
    if span <= 0:
        return 0
    position %= 2 * span
    return position if position < span else 2 * span - position


async def render_mp4(request: VideoRequest,
                     progress: Callable[[int], None] | None = None) -> bytes:
    """The MP4 bytes of a request; raises RenderError. `progress` gets 0..99 while encoding."""
    if FAIL_MARK in request.prompt:
        raise RenderError("video_generation_failed",
                          "The reference backend failed this job as its prompt asked ([[fail]]).")
    width, height = frame_size(request.size)
    total = frame_count(request.seconds)
    with tempfile.TemporaryDirectory(prefix="ref-video-") as folder:
        path = os.path.join(folder, "clip.mp4")
        command = [media.ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                   "-r", str(FPS), "-i", "pipe:0", "-c:v", "libx264", "-preset", "ultrafast",
                   "-threads", "1", "-pix_fmt", "yuv420p", "-movflags", "+faststart",
                   "-map_metadata", "-1", "-f", "mp4", path]
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(RENDER_TIMEOUT_S):
                await _feed(process, request, total, progress)
                stderr = await process.stderr.read(4096)
                returncode = await process.wait()
        except TimeoutError:
            raise RenderError("internal_error", "Rendering timed out.") from None
        except (BrokenPipeError, ConnectionResetError):
            returncode, stderr = await process.wait(), b""
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if returncode != 0:
            raise RenderError("internal_error", f"The encoder failed: {stderr[-300:]!r}")
        with open(path, "rb") as clip:
            return clip.read()


async def _feed(process: asyncio.subprocess.Process, request: VideoRequest, total: int,
                progress: Callable[[int], None] | None) -> None:
    for start in range(0, total, _CHUNK_FRAMES):
        process.stdin.write(frames(request, start, min(_CHUNK_FRAMES, total - start)))
        await process.stdin.drain()
        if progress is not None:
            progress(99 * (start + _CHUNK_FRAMES) // total if start + _CHUNK_FRAMES < total
                     else 99)
    process.stdin.close()
    await process.stdin.wait_closed()


# ---- jobs ---------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Job:
    id: str
    request: VideoRequest
    created_at: int
    status: str = "queued"  # queued -> in_progress -> completed | failed
    progress: int = 0
    completed_at: int | None = None
    error: dict | None = None
    content: bytes | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    def to_json(self) -> dict:
        """The job as OpenAI's video object."""
        return {"id": self.id, "object": "video", "model": self.request.model,
                "status": self.status, "progress": self.progress,
                "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": None, "error": self.error, "prompt": self.request.prompt,
                "remixed_from_video_id": None, "seconds": str(self.request.seconds),
                "size": self.request.size}


class Jobs:
    """Video jobs in memory: rendered in the background, RENDERS_MAX at once, JOBS_MAX kept."""

    def __init__(self, on_finished: Callable[[Job], None]) -> None:
        self._jobs: dict[str, Job] = {}  # insertion order is creation order
        self._tasks: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(RENDERS_MAX)
        self._on_finished = on_finished
        self._ids = itertools.count(1)

    def create(self, request: VideoRequest) -> Job:
        """A new queued job; raises media.Invalid (429) when the queue is full."""
        pending = sum(not job.finished for job in self._jobs.values())
        if pending >= PENDING_MAX:
            raise media.Invalid(f"Too many video jobs in progress (at most {PENDING_MAX}); "
                                "retry later.", None, "rate_limit_exceeded", 429, "requests")
        self._make_room()
        job = Job(f"video_{secrets.token_hex(16)}{next(self._ids):x}", request, int(time.time()))
        self._jobs[job.id] = job
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def close(self) -> None:
        """Cancels every render; for the application's shutdown."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _make_room(self) -> None:
        # At most PENDING_MAX jobs are unfinished, so with JOBS_MAX > PENDING_MAX a finished
        # job is always there to drop.
        while len(self._jobs) >= JOBS_MAX:
            oldest = next(job_id for job_id, job in self._jobs.items() if job.finished)
            del self._jobs[oldest]

    async def _run(self, job: Job) -> None:
        async with self._slots:
            job.status = "in_progress"

            def progress(percent: int) -> None:
                job.progress = percent

            try:
                job.content = await render_mp4(job.request, progress)
            except RenderError as exc:
                job.status, job.error = "failed", {"code": exc.code, "message": str(exc)}
            except Exception:  # a job must end failed, never stay in progress
                log.exception("video job %s", job.id)
                job.status = "failed"
                job.error = {"code": "internal_error", "message": "Rendering failed."}
            else:
                job.status, job.progress = "completed", 100
            job.completed_at = int(time.time())
            self._on_finished(job)
