"""Input tokens the reference backend counts for chat content parts that are not text.

  image_url    85 with "detail": "low", else 765 (OpenAI's count for a 1024x1024 image at
               high detail: 4 tiles of 170, plus 85). The image is never fetched: a URL is
               only a string here, so the backend works offline and reaches nothing.
  input_audio  10 per second of audio, rounded up, on the frames libsndfile reads from the
               base64 data (WAV, FLAC, MP3, OGG); data that is not base64 audio is a 400.
  file         one per 4 bytes of the decoded file_data (a data: URL or plain base64), rounded
               up; a file_id counts nothing.
Any other part counts nothing. Each is within what the reference catalog's rules hold for a
part (1445 an image, 10 a second of audio, a byte a token), so a call's prompt_tokens stay
below the ledger's worst case.
"""

import base64
import binascii
import io

import soundfile

IMAGE_TOKENS, IMAGE_TOKENS_LOW = 765, 85
AUDIO_TOKENS_PER_S = 10
FILE_BYTES_PER_TOKEN = 4


def prompt_tokens(messages: list[dict]) -> int:
    """Tokens of every non-text part of the messages; ValueError for one that cannot be read."""
    total = 0
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            total += _part_tokens(part)
    return total


def _part_tokens(part: dict) -> int:
    kind = part.get("type")
    inner = part.get(kind) if isinstance(kind, str) else None
    if kind == "image_url":
        if not isinstance(inner, dict) or not isinstance(inner.get("url"), str):
            raise ValueError("An image_url part needs an object with a string 'url'.")
        return IMAGE_TOKENS_LOW if inner.get("detail") == "low" else IMAGE_TOKENS
    if kind == "input_audio":
        if not isinstance(inner, dict) or not isinstance(inner.get("data"), str):
            raise ValueError("An input_audio part needs an object with base64 'data'.")
        try:
            info = soundfile.info(io.BytesIO(_decode(inner["data"])))
        except (RuntimeError, soundfile.LibsndfileError, ValueError):
            raise ValueError("The input_audio data is not audio this backend can read.") from None
        return -(-info.frames * AUDIO_TOKENS_PER_S // info.samplerate)
    if kind == "file":
        data = inner.get("file_data") if isinstance(inner, dict) else None
        if not isinstance(data, str):
            return 0
        if data[:5].lower() == "data:":
            data = data.partition(",")[2]
        return -(-len(_decode(data)) // FILE_BYTES_PER_TOKEN)
    return 0


def _decode(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("Part data must be base64.") from None
