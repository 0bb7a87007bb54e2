"""Audio for the media tests: a sine tone as 16-bit WAV, and how many frames an independent
decoder (ffmpeg, the one the reference backend ships with) gets out of some bytes."""
import io
import subprocess

import numpy as np
import soundfile


def sine_wav(seconds: float, rate: int = 16_000, hz: float = 440.0, gain: float = 0.3) -> bytes:
    """`seconds` of a `hz` tone at `rate` Hz, mono, PCM_16 WAV."""
    t = np.arange(int(round(seconds * rate))) / rate
    out = io.BytesIO()
    soundfile.write(out, (gain * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate, format="WAV",
                    subtype="PCM_16")
    return out.getvalue()


def ffmpeg_frames(data: bytes, input_format: str) -> int:
    """Frames ffmpeg decodes from `data` (read as `input_format`), as mono 16-bit."""
    from backends.reference import media

    done = subprocess.run([media.ffmpeg_exe(), "-nostdin", "-v", "error", "-f", input_format,
                           "-i", "pipe:0", "-ac", "1", "-f", "s16le", "pipe:1"],
                          input=data, capture_output=True, check=True, timeout=60)
    return len(done.stdout) // 2
