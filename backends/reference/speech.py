"""Deterministic speech for the reference backend: a tone "syllable" per character, really encoded.

Audio is mono, 24 kHz, like OpenAI's. Its length follows one rule:
    samples = floor(characters * 1440 / speed + 0.5),  duration = samples / 24000 s
where characters = len(input) in Unicode code points, so 60 ms per character at speed 1.
Each character is a smooth tone burst whose pitch comes from the character, the voice and a
digest of (model, voice, instructions); spaces and punctuation are silent.

Formats and content types: mp3 audio/mpeg, opus audio/opus (Ogg Opus), aac audio/aac
(ADTS), flac audio/flac, wav audio/wav (16-bit PCM), pcm audio/pcm (raw 16-bit signed
little-endian, no header). mp3, opus, flac and wav decode to exactly `samples` frames;
ADTS carries no gapless information, so an aac decoder returns the samples plus AAC's
priming and padding (1024 to 2048 extra frames).
"""

import dataclasses
import hashlib
import io
import math
import subprocess
from collections.abc import Mapping

import numpy as np
import soundfile

from backends.reference import media

SAMPLE_RATE = 24_000
SAMPLES_PER_CHAR = 1440  # 60 ms at 24 kHz
INPUT_CHARS_MAX = 4096
INSTRUCTIONS_CHARS_MAX = 4096
SPEED_MIN, SPEED_MAX = 0.25, 4.0
# Base pitch of each voice in Hz; marin and cedar are OpenAI's newer voices.
VOICES = {"alloy": 180, "ash": 120, "ballad": 140, "coral": 210, "echo": 110, "fable": 160,
          "onyx": 95, "nova": 230, "sage": 190, "shimmer": 240, "verse": 150, "marin": 200,
          "cedar": 130}
CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac",
                 "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}
_SOUNDFILE_FORMATS = {"mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS"),
                      "flac": ("FLAC", "PCM_16"), "wav": ("WAV", "PCM_16")}
# Synthesis works in blocks so that the longest input (4096 characters at speed 0.25,
# about 16 minutes) never needs more than a few block-sized arrays at once.
_BLOCK_SAMPLES = 1 << 18
_AAC_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True, slots=True)
class SpeechRequest:
    model: str
    input: str
    voice: str
    response_format: str
    speed: float
    instructions: str


def parse(body: Mapping) -> SpeechRequest:
    """The validated request; raises media.Invalid."""
    model = media.string(body, "model", 256)
    text = media.string(body, "input", INPUT_CHARS_MAX)
    if isinstance(body.get("voice"), dict):
        raise media.Invalid("Custom voices are not supported here; use a built-in voice.",
                            "voice", "invalid_value")
    voice = media.choice(body, "voice", VOICES, None)
    response_format = media.choice(body, "response_format", CONTENT_TYPES, "mp3")
    speed = media.number(body, "speed", SPEED_MIN, SPEED_MAX, 1.0)
    instructions = media.string(body, "instructions", INSTRUCTIONS_CHARS_MAX, "", empty_ok=True)
    if media.choice(body, "stream_format", ("audio", "sse"), "audio") == "sse":
        raise media.Invalid("stream_format 'sse' is not supported; use 'audio'.", "stream_format",
                            "invalid_value")
    return SpeechRequest(model, text, voice, response_format, speed, instructions)


def sample_count(characters: int, speed: float) -> int:
    """Frames of audio for `characters` characters at `speed` (the rule in the module docstring)."""
    return math.floor(characters * SAMPLES_PER_CHAR / speed + 0.5)


def synthesize(request: SpeechRequest) -> np.ndarray:
    """The audio as int16 samples at SAMPLE_RATE; deterministic from the request."""
    chars = len(request.input)
    total = sample_count(chars, request.speed)
    key = f"{request.model}\x00{request.voice}\x00{request.instructions}".encode(
        "utf-8", "surrogatepass")
    salt = hashlib.blake2b(key, digest_size=8).digest()[0]
    codes = np.fromiter(map(ord, request.input), dtype=np.int64, count=chars)
    semitones = (codes * 7 + salt) % 12
    pitch_hz = VOICES[request.voice] * np.exp2(semitones / 12)
    voiced = np.fromiter((c.isalnum() for c in request.input), dtype=bool, count=chars)
    step = (2 * np.pi / SAMPLE_RATE) * pitch_hz  # phase advance per sample, per character
    out = np.empty(total, dtype=np.int16)
    phase = 0.0
    for start in range(0, total, _BLOCK_SAMPLES):
        sample = np.arange(start, min(total, start + _BLOCK_SAMPLES), dtype=np.int64)
        scaled = sample * chars  # sample s belongs to character s * chars // total
        index = scaled // total
        within = (scaled - index * total) / total  # 0..1 through the character
        phases = phase + np.cumsum(step[index])
        phase = float(phases[-1]) % (2 * np.pi)
        envelope = np.sin(np.pi * within) ** 2 * voiced[index]
        wave = 0.6 * np.sin(phases) + 0.25 * np.sin(2 * phases) + 0.1 * np.sin(3 * phases)
        out[start:start + len(sample)] = envelope * wave * (0.5 * 32767)
    return out


def encode(samples: np.ndarray, response_format: str) -> bytes:
    """int16 mono samples at SAMPLE_RATE as a file of the format."""
    if response_format == "pcm":
        return samples.astype("<i2", copy=False).tobytes()
    if response_format == "aac":
        return _aac(samples)
    container, subtype = _SOUNDFILE_FORMATS[response_format]
    out = io.BytesIO()
    soundfile.write(out, samples, SAMPLE_RATE, format=container, subtype=subtype)
    return out.getvalue()


def speech(request: SpeechRequest) -> bytes:
    """The response body for a request."""
    return encode(synthesize(request), request.response_format)


def _aac(samples: np.ndarray) -> bytes:
    command = [media.ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error",
               "-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", "1", "-i", "pipe:0",
               "-c:a", "aac", "-b:a", "64k", "-f", "adts", "pipe:1"]
    done = subprocess.run(command, input=samples.astype("<i2", copy=False).tobytes(),
                          capture_output=True, timeout=_AAC_TIMEOUT_S, check=False)
    if done.returncode != 0 or not done.stdout:
        raise RuntimeError(f"ffmpeg could not encode AAC: {done.stderr[-500:]!r}")
    return done.stdout
