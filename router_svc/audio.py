"""Decoding uploaded audio for its exact duration: what a transcription is billed on.

Billing never trusts the backend's count: the gateway decodes every frame itself and
counts them. libsndfile (through soundfile: WAV, FLAC, OGG Vorbis/Opus, MP3, AIFF...)
decodes first; anything it cannot open goes to the ffmpeg binary bundled with
imageio-ffmpeg (m4a/mp4, webm, aac...), limited to the first audio stream, local files
and a list of audio containers. Duration = frames decoded / sample rate. A file neither
can read, or with no audio, is refused (400 invalid_file) and costs nothing.
"""
import asyncio
import dataclasses
import functools
import io
import os
import re
import tempfile

import numpy as np
import soundfile

from common import errors

_BLOCK_FRAMES = 1 << 16
_READ_BYTES = 1 << 20
# Demuxers ffmpeg may use: audio containers only, so a playlist or concat script in an
# upload cannot make it open other files or URLs.
_FFMPEG_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,aac,mp3,ogg,wav,flac,aiff,caf,"
                   "amr,asf,avi,mpeg,mpegts,opus,w64,au")
_OUTPUT_RATE = re.compile(rb"Output #0.*?Audio: [^\n]*?, (\d+) Hz", re.S)


@dataclasses.dataclass(frozen=True)
class Decoded:
    frames: int
    rate: int
    decoder: str  # "soundfile" or "ffmpeg"


def _invalid() -> errors.InvalidRequest:
    return errors.InvalidRequest("The audio file could not be decoded or its format is not supported.",
                                 param="file", code="invalid_file")


def _too_long(seconds_max: int) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"The audio is longer than this model takes ({seconds_max} s).", param="file",
                                 code="audio_too_long")


@functools.cache
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def decode_soundfile(data, seconds_max: int) -> Decoded:
    """Every frame through libsndfile; raises soundfile's errors for what it cannot read."""
    frames = 0
    with soundfile.SoundFile(io.BytesIO(data)) as source:
        rate = source.samplerate
        frames_max = seconds_max * rate
        buffer = np.empty((_BLOCK_FRAMES, source.channels), dtype=np.float32)
        while True:  # ends: the end of the file, or frames_max
            count = source.read(out=buffer, dtype="float32").shape[0]
            if not count:
                break
            frames += count
            if frames > frames_max:
                raise _too_long(seconds_max)
    if not rate:
        raise _invalid()
    return Decoded(frames, rate, "soundfile")


class Decoder:
    """Decodes uploads, at most `concurrency` at once, each within `timeout_s`."""

    def __init__(self, concurrency: int, timeout_s: float) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self.timeout_s = timeout_s

    async def decode(self, data, seconds_max: int) -> Decoded:
        async with self._slots:
            try:
                async with asyncio.timeout(self.timeout_s):
                    try:
                        return await asyncio.to_thread(decode_soundfile, data, seconds_max)
                    except errors.ApiError:
                        raise
                    except Exception:  # noqa: BLE001 - libsndfile refuses in several ways; ffmpeg gets a go
                        return await self._ffmpeg(data, seconds_max)
            except TimeoutError:
                raise errors.InvalidRequest("The audio file took too long to decode.", param="file",
                                            code="invalid_file") from None

    async def _ffmpeg(self, data, seconds_max: int) -> Decoded:
        with tempfile.TemporaryDirectory(prefix="router-stt-") as folder:
            source, log_path = os.path.join(folder, "upload"), os.path.join(folder, "ffmpeg.log")
            await asyncio.to_thread(_write, source, data)
            command = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-protocol_whitelist", "file",
                       "-format_whitelist", _FFMPEG_FORMATS, "-i", source, "-map", "0:a:0", "-vn", "-ac", "1",
                       "-t", str(seconds_max + 1), "-c:a", "pcm_s16le", "-f", "s16le", "pipe:1"]
            with open(log_path, "wb") as log:
                process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL,
                                                               stdout=asyncio.subprocess.PIPE, stderr=log)
            size = 0
            try:
                while chunk := await process.stdout.read(_READ_BYTES):  # ends: ffmpeg stops at -t
                    size += len(chunk)
                returncode = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            with open(log_path, "rb") as log:
                found = _OUTPUT_RATE.search(log.read(1 << 16))
        if returncode != 0 or found is None or size < 2:
            raise _invalid()
        rate, frames = int(found.group(1)), size // 2
        if frames > seconds_max * rate:
            raise _too_long(seconds_max)
        return Decoded(frames, rate, "ffmpeg")


def _write(path: str, data) -> None:
    with open(path, "wb") as out:
        out.write(data)
