"""How long an uploaded audio file can be, from its first bytes and its size.

ledger_svc holds a transcription's worst case from this before the call runs;
router_svc charges the exact decoded duration afterwards and refuses (400, no
charge) audio longer than what was held, so the charge never exceeds the hold.

- WAV (PCM, float, A-law, mu-law) and FLAC state their length in the header: the
  duration is frames / sample rate, exactly what a decoder returns.
- Anything else (MP3, OGG, M4A, WebM...) is bounded by its size: a file of B bytes
  holds at most B / BYTES_PER_S_MIN seconds of audio, i.e. it is assumed to be coded
  at no less than 1 kbit/s, below every speech codec in use (Opus >= 6, AMR >= 4.75,
  MP3 >= 8 kbit/s). Audio coded more thinly than that (long digital silence) is
  refused rather than held too little for.
"""

BYTES_PER_S_MIN = 125  # 1 kbit/s
UPLOAD_BYTES_MAX = 25_000_000  # OpenAI's 25 MB upload limit, in decimal megabytes
_CHUNKS_MAX = 64
# WAVE_FORMAT_PCM, IEEE_FLOAT, ALAW, MULAW: one block per frame, so frames = data bytes / block align.
_FRAME_FORMATS = frozenset({1, 3, 6, 7})
_EXTENSIBLE = 0xFFFE


def ms_ceil(frames: int, rate: int) -> int:
    """Milliseconds of `frames` at `rate`, rounded up (a hold is never short)."""
    return -(-frames * 1000 // rate)


def ms_nearest(frames: int, rate: int) -> int:
    """Milliseconds of `frames` at `rate`, rounded half up (what is charged)."""
    return (frames * 2000 + rate) // (2 * rate)


def size_bound_ms(size_bytes: int) -> int:
    return -(-max(size_bytes, 0) * 1000 // BYTES_PER_S_MIN)


def header_frames(head: bytes) -> tuple[int, int, str] | None:
    """(frames, sample rate, "wav" or "flac") when the first bytes of a file state its length."""
    head = bytes(head)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return _wav(head)
    return _flac(head)


def worst_ms(head: bytes, size_bytes: int) -> tuple[int, str]:
    """(the longest the file can be in milliseconds, how that was found)."""
    found = header_frames(head)
    if found is not None:
        frames, rate, kind = found
        return ms_ceil(frames, rate), kind + " header"
    return size_bound_ms(size_bytes), "size bound"


def _wav(head: bytes) -> tuple[int, int, str] | None:
    position, block_align, rate = 12, 0, 0
    for _ in range(_CHUNKS_MAX):  # bounded: a header walks a few chunks
        if position + 8 > len(head):
            return None
        chunk, size = head[position:position + 4], int.from_bytes(head[position + 4:position + 8], "little")
        body = position + 8
        if chunk == b"fmt ":
            if size < 16 or body + 16 > len(head):
                return None
            fmt = int.from_bytes(head[body:body + 2], "little")
            rate = int.from_bytes(head[body + 4:body + 8], "little")
            block_align = int.from_bytes(head[body + 12:body + 14], "little")
            if fmt == _EXTENSIBLE and size >= 40 and body + 26 <= len(head):
                fmt = int.from_bytes(head[body + 24:body + 26], "little")
            if fmt not in _FRAME_FORMATS or not rate or not block_align:
                return None
        elif chunk == b"data":
            # 0 and 0xFFFFFFFF mean "unknown" (streamed WAV, RF64).
            if not rate or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align, rate, "wav"
        position = body + size + (size & 1)
    return None


def _flac(head: bytes) -> tuple[int, int, str] | None:
    start = 0
    if head[:3] == b"ID3" and len(head) >= 10:
        size = 0
        for byte in head[6:10]:
            size = (size << 7) | (byte & 0x7F)
        start = 10 + size + (10 if head[5] & 0x10 else 0)
    if head[start:start + 4] != b"fLaC" or len(head) < start + 8 + 34:
        return None
    if head[start + 4] & 0x7F != 0:  # the first metadata block must be STREAMINFO
        return None
    info = head[start + 8:start + 8 + 34]
    bits = int.from_bytes(info[10:18], "big")
    rate, frames = bits >> 44, bits & ((1 << 36) - 1)
    if not rate or not frames:  # 0 samples means "unknown"
        return None
    return frames, rate, "flac"
