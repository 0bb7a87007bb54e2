"""Speech-to-text for the reference backend: a real decode for the exact duration, a made-up text.

Duration = frames decoded / sample rate, counted while decoding (never taken from a header).
soundfile (libsndfile: WAV, FLAC, OGG Vorbis/Opus, MP3, AIFF...) decodes first; anything it
cannot open goes to the ffmpeg binary (m4a/mp4, webm, mpeg, aac...), limited to the first
audio stream, local files and a list of audio containers, downmixed to mono, at its own rate.
A file neither reads, or with no audio, is refused with code "invalid_file".

Transcript: the first segment starts "Audio of <duration with 3 decimals> seconds.", then
words from text.VOCABULARY drawn by a generator seeded with a digest of the decoded samples,
two words per second of audio; segments are 30 s long, as Whisper's window is.
"""

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import subprocess
import tempfile
import threading
from collections.abc import Mapping

import soundfile

from backends.reference import media, text

FILE_BYTES_MAX = 25_000_000  # OpenAI's 25 MB upload limit, in decimal megabytes
DURATION_S_MIN = 0.1  # OpenAI refuses shorter audio
DURATION_S_MAX = 7200  # bounds decoding time for highly compressed uploads
PROMPT_CHARS_MAX = 4096
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
SEGMENT_S = 30
WORDS_PER_S = 2
_LANGUAGE_RE = re.compile(r"[a-z]{2,3}")
_LANGUAGE_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish",
                   "it": "italian", "pt": "portuguese", "nl": "dutch", "ja": "japanese",
                   "zh": "chinese", "ko": "korean", "ru": "russian", "pl": "polish"}
_BLOCK_FRAMES = 1 << 16
_READ_BYTES = 1 << 20
_DECODE_TIMEOUT_S = 120
# Demuxers ffmpeg may use: audio containers only, so a playlist or concat script in an
# upload cannot make it open other files or URLs.
_FFMPEG_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,aac,mp3,ogg,wav,flac,aiff,caf,"
                   "amr,asf,avi,mpeg,mpegts,opus,w64,au")
_OUTPUT_RATE_RE = re.compile(rb"Output #0.*?Audio: [^\n]*?, (\d+) Hz", re.S)
_VOCABULARY_INDEX = {word: i for i, word in enumerate(text.VOCABULARY)}


@dataclasses.dataclass(frozen=True, slots=True)
class TranscriptionRequest:
    model: str
    language: str
    prompt: str
    response_format: str
    temperature: float
    word_timestamps: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Decoded:
    frames: int
    sample_rate: int
    digest: bytes  # BLAKE2b of the decoded samples as the decoder returned them
    decoder: str  # "soundfile" or "ffmpeg"

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def parse(fields: Mapping) -> TranscriptionRequest:
    """The validated form fields other than the file; raises media.Invalid."""
    model = media.string(fields, "model", 256)
    language = media.string(fields, "language", 3, "en")
    if not _LANGUAGE_RE.fullmatch(language):
        raise media.Invalid("'language' must be an ISO-639-1 code such as 'en'.", "language",
                            "invalid_value")
    prompt = media.string(fields, "prompt", PROMPT_CHARS_MAX, "", empty_ok=True)
    response_format = media.choice(fields, "response_format", RESPONSE_FORMATS, "json")
    temperature = media.number(fields, "temperature", 0.0, 1.0, 0.0)
    if media.flag(fields, "stream"):
        raise media.Invalid("Streaming transcriptions are not supported here.", "stream",
                            "invalid_value")
    granularities = fields.get("timestamp_granularities[]", fields.get("timestamp_granularities"))
    granularities = [granularities] if isinstance(granularities, str) else granularities or []
    if not isinstance(granularities, list) or not set(granularities) <= {"word", "segment"}:
        raise media.Invalid("'timestamp_granularities' may hold 'word' and 'segment'.",
                            "timestamp_granularities", "invalid_value")
    return TranscriptionRequest(model, language, prompt, response_format, temperature,
                                "word" in granularities)


def decode(data: bytes) -> Decoded:
    """Decodes the whole upload; raises media.Invalid when it is not audio we can read."""
    try:
        decoded = _soundfile(data)
    except media.Invalid:
        raise
    except Exception:  # libsndfile's refusals come as several types; ffmpeg gets a go
        decoded = _ffmpeg(data)
    if decoded.seconds < DURATION_S_MIN:
        raise media.Invalid(f"Audio file is too short. Minimum audio length is "
                            f"{DURATION_S_MIN} seconds.", "file", "audio_too_short")
    return decoded


def _too_long() -> media.Invalid:
    return media.Invalid(f"Audio is longer than {DURATION_S_MAX} seconds.", "file",
                         "audio_too_long")


def _soundfile(data: bytes) -> Decoded:
    digest = hashlib.blake2b(digest_size=16)
    frames = 0
    with soundfile.SoundFile(io.BytesIO(data)) as audio:
        rate = audio.samplerate
        frames_max = DURATION_S_MAX * rate
        while len(block := audio.read(_BLOCK_FRAMES, dtype="float32")):  # ends: frames_max
            frames += len(block)
            if frames > frames_max:
                raise _too_long()
            digest.update(block.tobytes())
    return Decoded(frames, rate, digest.digest(), "soundfile")


def _ffmpeg(data: bytes) -> Decoded:
    invalid = media.Invalid("The audio file could not be decoded or its format is not "
                            "supported.", "file", "invalid_file")
    with tempfile.TemporaryDirectory(prefix="ref-stt-") as folder:
        source = os.path.join(folder, "upload")
        log_path = os.path.join(folder, "ffmpeg.log")
        with open(source, "wb") as out:
            out.write(data)
        command = [media.ffmpeg_exe(), "-nostdin", "-hide_banner",
                   "-protocol_whitelist", "file", "-format_whitelist", _FFMPEG_FORMATS,
                   "-i", source, "-map", "0:a:0", "-vn", "-ac", "1",
                   "-t", str(DURATION_S_MAX + 1), "-c:a", "pcm_f32le", "-f", "f32le", "pipe:1"]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=log)
        timer = threading.Timer(_DECODE_TIMEOUT_S, process.kill)
        timer.start()
        digest = hashlib.blake2b(digest_size=16)
        size = 0
        try:
            with process.stdout:
                while chunk := process.stdout.read(_READ_BYTES):  # ends: ffmpeg stops at -t
                    size += len(chunk)
                    digest.update(chunk)
            returncode = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        with open(log_path, "rb") as log:
            found = _OUTPUT_RATE_RE.search(log.read(1 << 16))
    if returncode != 0 or found is None or size < 4:
        raise invalid
    rate = int(found.group(1))
    frames = size // 4
    if frames > DURATION_S_MAX * rate:
        raise _too_long()
    return Decoded(frames, rate, digest.digest(), "ffmpeg")


# ---- transcript ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    start: float
    end: float
    words: tuple[str, ...]
    text: str


def segments(decoded: Decoded) -> list[Segment]:
    """The transcript, one segment per 30 s of audio; deterministic from the decoded samples."""
    duration = decoded.seconds
    rng = random.Random(decoded.digest)
    out = []
    count = max(1, math.ceil(duration / SEGMENT_S))  # at most DURATION_S_MAX / SEGMENT_S
    for i in range(count):
        start, end = i * SEGMENT_S, min(duration, (i + 1) * SEGMENT_S)
        words = rng.choices(text.VOCABULARY, k=max(1, round((end - start) * WORDS_PER_S)))
        if i == 0:
            words = ["Audio", "of", f"{duration:.3f}", "seconds."] + words
        words[-1] = words[-1].rstrip(".") + "."
        out.append(Segment(float(start), float(end), tuple(words), " " + " ".join(words)))
    return out


def render(request: TranscriptionRequest, decoded: Decoded) -> tuple[bytes, str]:
    """(body, content type) of the response in the requested format."""
    parts = segments(decoded)
    full_text = "".join(part.text for part in parts).strip()
    usage = {"type": "duration", "seconds": decoded.seconds}
    fmt = request.response_format
    if fmt == "json":
        return _json_bytes({"text": full_text, "usage": usage}), "application/json"
    if fmt == "verbose_json":
        body = {"task": "transcribe",
                "language": _LANGUAGE_NAMES.get(request.language, request.language),
                "duration": decoded.seconds, "text": full_text,
                "segments": [_segment_json(i, part, request.temperature)
                             for i, part in enumerate(parts)],
                "usage": usage}
        if request.word_timestamps:
            body["words"] = [word for part in parts for word in _words_json(part)]
        return _json_bytes(body), "application/json"
    if fmt == "text":
        return (full_text + "\n").encode(), TEXT_CONTENT_TYPE
    if fmt == "srt":
        cues = [f"{i + 1}\n{_clock(p.start, ',')} --> {_clock(p.end, ',')}\n{p.text.strip()}\n"
                for i, p in enumerate(parts)]
        return "\n".join(cues).encode(), TEXT_CONTENT_TYPE
    cues = [f"{_clock(p.start, '.')} --> {_clock(p.end, '.')}\n{p.text.strip()}\n" for p in parts]
    return ("WEBVTT\n\n" + "\n".join(cues)).encode(), TEXT_CONTENT_TYPE


def _json_bytes(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _segment_json(index: int, part: Segment, temperature: float) -> dict:
    vocabulary = _VOCABULARY_INDEX
    return {"id": index, "seek": round(part.start * 100), "start": part.start, "end": part.end,
            "text": part.text, "tokens": [vocabulary.get(w.strip(".").lower(), 0) + 1000
                                          for w in part.words],
            "temperature": temperature, "avg_logprob": -0.25, "compression_ratio": 1.5,
            "no_speech_prob": 0.01}


def _words_json(part: Segment) -> list[dict]:
    step = (part.end - part.start) / len(part.words)
    return [{"word": word, "start": round(part.start + i * step, 3),
             "end": round(part.start + (i + 1) * step, 3)} for i, word in enumerate(part.words)]


def _clock(seconds: float, decimal: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"
