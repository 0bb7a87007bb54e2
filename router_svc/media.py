"""The rules of media calls: validating images, video, speech and transcription requests
against the catalog's options and limits, and what may be charged for them.

Pure: no grpc, HTTP or SQL. Every check raises common.errors.InvalidRequest naming the
field (OpenAI's `param`), before any backend is called, so a refused call is voided
and costs nothing. Units: images (per image returned), video_ms (per second of video
produced), characters (per Unicode code point of speech input), audio_ms (per minute
of input audio, its exact decoded duration).
"""
import dataclasses
import json
import math
import re

from common import audio, catalog, errors, held as common_held, multipart

# Defaults for options a catalog entry leaves out (OpenAI's and the reference backend's).
IMAGE_SIZES = ("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792")
IMAGE_FORMATS = ("b64_json", "url")
IMAGE_QUALITIES = ("auto", "standard", "hd", "low", "medium", "high")
IMAGE_STYLES = ("vivid", "natural")
VIDEO_SIZES = ("720x1280", "1280x720", "1024x1792", "1792x1024")
VIDEO_SECONDS_MIN = 1
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse")
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
SPEECH_CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac", "flac": "audio/flac",
                        "wav": "audio/wav", "pcm": "audio/pcm"}
SPEED_MIN, SPEED_MAX = 0.25, 4.0
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
AUDIO_MS_MIN = 100  # OpenAI refuses audio shorter than 0.1 s
PROMPT_CHARS_MAX = 32_000
SHORT_TEXT_CHARS_MAX = 4096
USER_CHARS_MAX = 512
_LANGUAGE = re.compile(r"[a-z]{2,3}")


def _options(model: catalog.Model, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(str(v) for v in model.options.get(name) or default)


def _invalid(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param, code="invalid_value")


def _text(value: str, name: str, chars_max: int, *, required: bool = True) -> str:
    if required and not value.strip():
        raise errors.InvalidRequest(f"'{name}' must not be empty.", param=name, code="empty_" + name)
    if len(value) > chars_max:
        raise errors.InvalidRequest(f"'{name}' is too long: {len(value)} characters, at most {chars_max}.",
                                    param=name, code="string_above_max_length")
    return value


def _one_of(value: str, name: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    if not value and default is not None:
        return default
    if value not in allowed:
        raise _invalid(f"Invalid {name} '{value}'. Supported values are: {', '.join(allowed)}.", name)
    return value


# --- what was held --------------------------------------------------------------------

def within_hold(held: common_held.Held | None, model_id: str, unit: str, count: int) -> None:
    """Refuses a call that would cost more than ledger_svc held for it (no hold header: no bound)."""
    if held is None:
        return
    if held.model != model_id:
        raise errors.InvalidRequest(
            f"The gateway held this call for `{held.model}`, not `{model_id}`: it reads 'model' from the first "
            "64 KiB of a form, so send the 'model' field before a large 'file'.", param="model",
            code="model_after_file")
    limit = held.get(unit)
    if limit is not None and count > limit:
        if unit == "audio_ms":
            raise errors.InvalidRequest(
                f"The audio lasts {count / 1000:.3f} s, longer than its file's size allows for: the gateway holds "
                f"credit for at most 1 second per {audio.BYTES_PER_S_MIN} bytes of a file that does not state its "
                "length (WAV and FLAC do).", param="file", code="audio_exceeds_hold")
        raise errors.InvalidRequest(f"The call asks for {count} {unit}, more than was held ({limit}).",
                                    param=None, code="exceeds_hold")


# --- images ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageAsk:
    prompt: str
    n: int
    size: str
    response_format: str
    extra: dict

    def backend_body(self) -> dict:
        # Always bytes from the backend: URLs are served by this gateway, never the backend's.
        return {"prompt": self.prompt, "n": self.n, "size": self.size, "response_format": "b64_json", **self.extra}


def image_request(request, model: catalog.Model) -> ImageAsk:
    prompt = _text(request.prompt, "prompt", int(model.options.get("max_prompt_characters", PROMPT_CHARS_MAX)))
    n_max = model.limit("max_images", catalog.IMAGES_MAX)
    n = request.n if request.HasField("n") else 1
    if not 1 <= n <= n_max:
        raise _invalid(f"n must be between 1 and {n_max}, got {n}.", "n")
    sizes = _options(model, "sizes", IMAGE_SIZES)
    size = _one_of(request.size, "size", sizes, str(model.options.get("default_size", sizes[0])))
    response_format = _one_of(request.response_format, "response_format",
                              _options(model, "response_formats", IMAGE_FORMATS), "b64_json")
    extra = {}
    if request.quality:
        extra["quality"] = _one_of(request.quality, "quality", _options(model, "qualities", IMAGE_QUALITIES))
    if request.style:
        extra["style"] = _one_of(request.style, "style", _options(model, "styles", IMAGE_STYLES))
    if request.user:
        extra["user"] = _text(request.user, "user", USER_CHARS_MAX)
    return ImageAsk(prompt, n, size, response_format, extra)


def image_kind(data: bytes) -> tuple[str, str]:
    """(content type, file extension) of image bytes, from their magic number."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png", "png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg", "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    return "application/octet-stream", "bin"


# --- speech ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SpeechAsk:
    input: str
    voice: str
    response_format: str
    speed: float | None
    instructions: str

    @property
    def characters(self) -> int:
        """What is billed: Unicode code points (Python's len of the decoded text)."""
        return len(self.input)

    @property
    def content_type(self) -> str:
        return SPEECH_CONTENT_TYPES.get(self.response_format, "application/octet-stream")

    def backend_body(self) -> dict:
        body = {"input": self.input, "voice": self.voice, "response_format": self.response_format}
        if self.speed is not None:
            body["speed"] = self.speed
        if self.instructions:
            body["instructions"] = self.instructions
        return body


def speech_request(request, model: catalog.Model) -> SpeechAsk:
    text = _text(request.input, "input", model.limit("max_input_characters", catalog.CHARACTERS_MAX))
    voice = _one_of(request.voice, "voice", _options(model, "voices", VOICES))
    response_format = _one_of(request.response_format, "response_format",
                              _options(model, "response_formats", SPEECH_FORMATS), "mp3")
    speed = None
    if request.HasField("speed"):
        if not math.isfinite(request.speed) or not SPEED_MIN <= request.speed <= SPEED_MAX:
            raise _invalid(f"speed must be between {SPEED_MIN} and {SPEED_MAX}, got {request.speed:g}.", "speed")
        speed = request.speed
    if request.stream_format and request.stream_format != "audio":
        raise _invalid("stream_format must be 'audio' here.", "stream_format")
    instructions = _text(request.instructions, "instructions", SHORT_TEXT_CHARS_MAX, required=False)
    return SpeechAsk(text, voice, response_format, speed, instructions)


# --- forms (video, transcription) -----------------------------------------------------

def read_form(content_type: str, data: bytes) -> multipart.Form:
    """A multipart or url-encoded form, or a JSON object, as fields and files."""
    try:
        form = multipart.read(data, content_type)
    except ValueError as error:
        raise errors.InvalidRequest(f"The request body cannot be read: {errors.echo(error)}", code="invalid_body") from None
    if form is None:
        raise errors.InvalidRequest("The request body must be multipart/form-data or JSON.", code="invalid_body")
    return form


def _field(form: multipart.Form, name: str) -> str | None:
    """A field as text (numbers from JSON as their decimal); None when absent or null."""
    value = form.fields.get(name)
    if isinstance(value, list):
        value = value[-1] if value else None
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise _invalid(f"'{name}' has the wrong type.", name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def form_model(form: multipart.Form) -> str:
    return _field(form, "model") or ""


# --- video ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VideoAsk:
    prompt: str
    seconds: int
    size: str

    def backend_body(self) -> dict:
        return {"prompt": self.prompt, "seconds": str(self.seconds), "size": self.size}


def video_request(form: multipart.Form, model: catalog.Model) -> VideoAsk:
    if form.files:
        name = next(iter(form.files))
        raise errors.InvalidRequest(f"'{errors.echo(name)}' (a reference file) is not supported here.", param=name,
                                    code="unsupported_parameter")
    prompt = _text(_field(form, "prompt") or "", "prompt",
                   int(model.options.get("max_prompt_characters", PROMPT_CHARS_MAX)))
    low = int(model.options.get("min_seconds", VIDEO_SECONDS_MIN))
    high = model.limit("max_video_seconds", catalog.VIDEO_SECONDS_MAX)
    raw = _field(form, "seconds")
    seconds = int(model.options.get("default_seconds", catalog.VIDEO_SECONDS_DEFAULT)) if raw is None else None
    if raw is not None and raw.isascii() and raw.isdigit() and len(raw) <= 6:
        seconds = int(raw)
    if seconds is None or not low <= seconds <= high:
        raise _invalid(f"seconds must be a whole number from {low} to {high}, got {raw!r}.", "seconds")
    sizes = _options(model, "sizes", VIDEO_SIZES)
    size = _one_of(_field(form, "size") or "", "size", sizes, str(model.options.get("default_size", sizes[0])))
    return VideoAsk(prompt, seconds, size)


def video_json(row: dict) -> dict:
    """A job as OpenAI's video object, under the gateway's own id."""
    return {"id": row["id"], "object": "video", "model": row["model"], "status": row["status"],
            "progress": row["progress"], "created_at": row["created_at"], "completed_at": row["completed_at"],
            "expires_at": None, "error": json.loads(row["error"]) if row["error"] else None,
            "prompt": row["prompt"], "remixed_from_video_id": None, "seconds": str(row["seconds"]),
            "size": row["size"]}


def produced_ms(job: dict, requested_s: int) -> int:
    """Video a completed backend job produced, never more than was asked (and held) for."""
    try:
        seconds = float(job.get("seconds", requested_s))
    except (TypeError, ValueError):
        seconds = requested_s
    if not math.isfinite(seconds) or seconds < 0:
        seconds = requested_s
    return round(1000 * min(seconds, requested_s))


# --- transcription --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TranscriptionAsk:
    file: multipart.Part
    fields: dict[str, str | list[str]]
    response_format: str


def transcription_request(form: multipart.Form, model: catalog.Model) -> TranscriptionAsk:
    upload = form.files.get("file")
    if upload is None:
        raise errors.InvalidRequest("'file' is required: the audio, as a multipart field named 'file'.",
                                    param="file", code="missing_file")
    if len(upload.data) > audio.UPLOAD_BYTES_MAX:
        raise errors.InvalidRequest(f"The file is larger than {audio.UPLOAD_BYTES_MAX} bytes (25 MB).",
                                    param="file", code="file_too_large")
    if not len(upload.data):
        raise errors.InvalidRequest("The file is empty.", param="file", code="invalid_file")
    response_format = _one_of(_field(form, "response_format") or "", "response_format",
                              _options(model, "response_formats", TRANSCRIPT_FORMATS), "json")
    language = _field(form, "language")
    if language is not None and not _LANGUAGE.fullmatch(language):
        raise _invalid("language must be an ISO-639-1 code such as 'en'.", "language")
    _text(_field(form, "prompt") or "", "prompt", SHORT_TEXT_CHARS_MAX, required=False)
    temperature = _field(form, "temperature")
    if temperature is not None:
        try:
            value = float(temperature)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1:
            raise _invalid("temperature must be a number between 0 and 1.", "temperature")
    if (_field(form, "stream") or "false") not in ("false", "False", "0"):
        raise _invalid("Streaming transcriptions are not supported here.", "stream")
    fields = {k: v for k, v in form.fields.items() if k not in ("model", "file", "stream")}
    return TranscriptionAsk(upload, fields, response_format)


def check_duration(ms: int, model: catalog.Model) -> None:
    if ms < AUDIO_MS_MIN:
        raise errors.InvalidRequest(f"Audio file is too short. Minimum audio length is {AUDIO_MS_MIN / 1000} "
                                    "seconds.", param="file", code="audio_too_short")
    longest_s = model.limit("max_audio_seconds", catalog.AUDIO_SECONDS_MAX)
    if ms > longest_s * 1000:
        raise errors.InvalidRequest(f"The audio lasts {ms / 1000:.3f} s; this model takes at most {longest_s} s.",
                                    param="file", code="audio_too_long")
