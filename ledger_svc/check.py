"""Envoy's third ext_authz filter: can the account pay for this call? Hold its worst case, or 402.

The filter runs after Envoy's JSON transcoder, so the body (raw_body,
pack_as_bytes) is always a gRPC frame of the router request message, whether
the caller spoke HTTP/JSON or native gRPC: 1 flag byte, 4-byte big-endian
length, protobuf. The path is the gRPC method path. Trusted headers from
auth_svc name the account (x-ts-account) and key (x-ts-key); Envoy strips any
a client sends.

An admitted call goes upstream with x-ts-hold (the hold's id, for the
settlement), x-ts-price (the price snapshot the charge will use) and x-ts-held
(common.held: the model and the units held, a text call's input and output
tokens, a media call's one unit), so router_svc sends the backend no more than
the hold covers and cuts or refuses anything beyond it. Anything
the ledger cannot decide (its database down, its queue full) fails the Check
itself, which Envoy answers with 503: a call is never let through unheld.
"""
import base64
import binascii
import dataclasses
import logging
import os
import types
import zlib

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.protobuf import any_pb2, struct_pb2
from google.rpc import error_details_pb2, status_pb2

from common import audio, authz, catalog, errors, held, multipart
from ledger_svc import config, domain, metrics, store as store_mod
from tokens.router.v1 import router_pb2

log = logging.getLogger(__name__)

INFERENCE = "/tokens.router.v1.Inference/"
CHAT_METHODS = ("CreateChatCompletion", "Chat", "StreamChat")
COMPLETION_METHODS = ("CreateCompletion", "Complete", "StreamComplete")
FREE_METHODS = ("ListModels", "GetModel", "GetImageFile", "GetVideo", "GetVideoContent")
# Decompressed request bodies larger than this are refused (Envoy bounds the compressed size).
BODY_BYTES_MAX = 64 * 1024 * 1024
# The largest Check this server takes: Envoy hands over a whole body of at most 1 MiB
# (the ext_authz filter's max_request_bytes), or the first 64 KiB of an upload (a
# 25 MB transcription never reaches the ledger whole), plus headers. grpc's default
# of 4 MiB would do; this leaves room should the filter's body limit grow.
CHECK_BYTES_MAX = 8 * 1024 * 1024


class BodyError(ValueError):
    """The body is not one gRPC-framed message of the method's request type."""


class InsufficientCredit(errors.ApiError):
    """The 402 of the public promise; native gRPC callers see FAILED_PRECONDITION with a QuotaFailure."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 402
    type = "insufficient_quota"
    default_code = "402"

    def __init__(self, message: str, account_id: str) -> None:
        super().__init__(message)
        self.account_id = account_id

    def body(self) -> dict:
        # The seed's body has no "param".
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def status_details(self) -> bytes:
        status = status_pb2.Status.FromString(super().status_details())
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"account:{self.account_id}",
            description="The account's available credit is used up; add funds to continue.")
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.QuotaFailure(violations=[violation]))
        status.details.append(packed)
        return status.SerializeToString()


class UnknownModel(errors.NotFound):
    default_code = "model_not_found"


class UploadTooLarge(errors.ApiError):
    """413: an audio file over the upload limit (Envoy refuses larger bodies on its own)."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 413
    type = "invalid_request_error"
    default_code = "file_too_large"


# What a transcoded HTTP caller looks like to common.authz.deny: the transcoder turned
# its request into gRPC (content-type application/grpc), but it wants a plain JSON answer.
_HTTP_CALLER = types.SimpleNamespace(headers={"content-type": "application/json"})


def _header_map(http) -> dict[str, str]:
    """Envoy's encode_raw_headers form (header_map) as the plain map the rest reads."""
    return {h.key: h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            for h in http.header_map.headers}


def _caller(headers) -> types.SimpleNamespace:
    """Who common.authz.deny answers: a transcoded HTTP caller (JSON) or a native gRPC one."""
    if headers.get("x-envoy-original-path"):
        return _HTTP_CALLER
    return types.SimpleNamespace(headers=headers)


class BodyTooLarge(BodyError):
    """The body was cut at the filter's limit: larger than the route takes."""


def unframe(raw: bytes, encoding: str = "") -> bytes:
    """The message inside a gRPC frame (decompressed when the flag says so)."""
    if len(raw) < 5:
        raise BodyError("the request body is not a gRPC message")
    flag, length = raw[0], int.from_bytes(raw[1:5], "big")
    if len(raw) < 5 + length:
        # Envoy hands over at most max_request_bytes of a longer body.
        raise BodyTooLarge("The request body is too large.")
    if len(raw) != 5 + length:
        raise BodyError("the request body holds more than one gRPC message")
    payload = raw[5:]
    if flag == 0:
        return payload
    if flag != 1:
        raise BodyError("the gRPC frame has an unknown flag")
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise BodyError(f"unsupported grpc-encoding {errors.echo(encoding)!r}")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(payload, BODY_BYTES_MAX)
    except zlib.error:
        raise BodyError("the compressed gRPC message is corrupt") from None
    if inflater.unconsumed_tail:
        raise BodyError("the request body is too large")
    return out


def _utf8(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _json_size(value: struct_pb2.Value) -> int:
    """Bytes of the value written as JSON (numbers approximately)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return _utf8(value.string_value) + 2
    if kind == "struct_value":
        return _struct_size(value.struct_value)
    if kind == "list_value":
        return 2 + sum(_json_size(item) + 1 for item in value.list_value.values)
    if kind == "number_value":
        return len(repr(value.number_value))
    return 5  # true, false, null


def _struct_size(struct: struct_pb2.Struct) -> int:
    return 2 + sum(_utf8(key) + 4 + _json_size(item) for key, item in struct.fields.items())


def _content_size(content: struct_pb2.Value, parts: list | None = None, where: str = "") -> int:
    """UTF-8 bytes of a message's text: a string, or the text of its text and refusal parts.
    Its other parts are added to `parts`, to be held by the model's rules (part_tokens)."""
    kind = content.WhichOneof("kind")
    if kind == "string_value":
        return _utf8(content.string_value)
    if kind != "list_value":
        return 0
    total = 0
    for index, part in enumerate(content.list_value.values):
        fields = part.struct_value.fields
        part_type = fields["type"].string_value if "type" in fields else ""
        if part_type in ("text", "refusal"):
            if part_type in fields:
                total += _utf8(fields[part_type].string_value)
        elif part_type and parts is not None:
            parts.append(_input_part(f"{where}[{index}]", part_type, fields))
    return total


# --- content parts that cost ------------------------------------------------------------
#
# A chat call's image, audio and file parts hold input tokens by the model's rule
# (common.catalog.InputRule): tokens_each per image (or per file); tokens_per_second on the
# audio's duration, from its WAV or FLAC header, else common.audio's bound from its size;
# tokens_per_byte on a file's decoded size. A part type the model does not accept, or one
# nobody knows, is refused here before anything is held. router_svc checks every part in
# full (URLs, data, media types) and refuses a bad one, voiding the hold; so the sizes here
# only need to be upper bounds for parts it lets through.

_AUDIO_HEAD_CHARS = 4 * (64 * 1024 // 3 + 1)  # base64 of an audio part's first 64 KiB


@dataclasses.dataclass(frozen=True)
class InputPart:
    """A content part that is not text: what its hold depends on."""

    where: str  # "messages[i].content[j]", the param a refusal names
    kind: str
    data_bytes: int = 0  # the most bytes its data decodes to
    head: bytes = b""  # audio: its first bytes, where a header states its length


def _input_part(where: str, kind: str, fields) -> InputPart:
    if kind == "input_audio":
        data = _inner(fields, "input_audio", "data")
        return InputPart(where, kind, _base64_bytes(data), _base64_head(data))
    if kind == "file":
        data = _inner(fields, "file", "file_data")
        if data[:5].lower() == "data:":
            data = data.partition(",")[2]
        return InputPart(where, kind, _base64_bytes(data))
    return InputPart(where, kind)


def _inner(fields, outer: str, name: str) -> str:
    inner = fields[outer].struct_value.fields if outer in fields else {}
    return inner[name].string_value if name in inner else ""


def _base64_bytes(text: str) -> int:
    """Base64 decodes to at most 3 bytes per 4 characters (router_svc refuses anything else)."""
    return -(-len(text) // 4) * 3


def _base64_head(text: str) -> bytes:
    try:
        return base64.b64decode(text[:_AUDIO_HEAD_CHARS])
    except (binascii.Error, ValueError):
        return b""  # no header read: the size bound holds


def part_tokens(parts: tuple[InputPart, ...], model: catalog.Model) -> int:
    """Input tokens the call's non-text parts hold by the model's rules; the 400 refusing a
    part the model does not accept."""
    total = 0
    for part in parts:
        rule = model.input_rule(part.kind, part.where)
        if rule.tokens_each:
            total += rule.tokens_each
        elif rule.tokens_per_second:
            worst_ms, _how = audio.worst_ms(part.head, part.data_bytes)
            total += -(-worst_ms * rule.tokens_per_second // 1000)
        else:
            total += part.data_bytes * rule.tokens_per_byte
    return total


def chat_call(body: bytes) -> domain.TextCall:
    try:
        request = router_pb2.CreateChatCompletionRequest.FromString(body)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError, whatever the backend
        raise BodyError("the body is not a chat completion request") from None
    size = 0
    parts: list[InputPart] = []
    for index, message in enumerate(request.messages):
        size += _content_size(message.content, parts, f"messages[{index}].content") + _utf8(message.name)
        if message.HasField("refusal"):
            size += _content_size(message.refusal)
        for call in message.tool_calls:
            size += _struct_size(call)
    for tool in request.tools:
        size += _struct_size(tool)
    if request.HasField("response_format"):
        size += _struct_size(request.response_format)
    if request.HasField("tool_choice"):
        size += _json_size(request.tool_choice)
    if request.HasField("max_completion_tokens"):
        max_tokens = request.max_completion_tokens
    elif request.HasField("max_tokens"):
        max_tokens = request.max_tokens
    else:
        max_tokens = None
    return domain.TextCall(model=request.model, text_bytes=size, segments=len(request.messages),
                           choices=request.n if request.HasField("n") else None, max_tokens=max_tokens,
                           parts=tuple(parts))


def _prompts(prompt: struct_pb2.Value) -> tuple[int, int]:
    """(prompts, tokens-or-bytes) of a completions prompt: a string, strings, or token arrays."""
    kind = prompt.WhichOneof("kind")
    if kind == "string_value":
        return 1, _utf8(prompt.string_value)
    if kind != "list_value" or not prompt.list_value.values:
        return 1, 0
    items = prompt.list_value.values
    if items[0].WhichOneof("kind") == "number_value":
        return 1, len(items)  # one prompt given as token ids: a token each
    count = size = 0
    for item in items:
        count += 1
        if item.WhichOneof("kind") == "list_value":
            size += len(item.list_value.values)
        else:
            size += _json_size(item)
    return count, size


def completion_call(body: bytes) -> domain.TextCall:
    try:
        request = router_pb2.CreateCompletionRequest.FromString(body)
    except Exception:  # noqa: BLE001
        raise BodyError("the body is not a completion request") from None
    count, size = _prompts(request.prompt)
    choices = request.n if request.HasField("n") else None
    if request.HasField("best_of") and request.best_of > (choices or 1):
        choices = request.best_of  # best_of choices are generated (and billed), n returned
    return domain.TextCall(model=request.model, text_bytes=size + _utf8(request.suffix), segments=count,
                           choices=choices, max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
                           per_segment_output=True)


# --- media worst cases ------------------------------------------------------------------
#
# images: n x per_image (n absent: 1); video: the requested seconds (absent: the model's
# default_seconds) x per_second; speech: the input's characters (Unicode code points) x
# per_character; transcription: the audio's duration from its WAV or FLAC header, else a
# bound from the file's size (common.audio), x per_minute. Each is clamped to the model's
# limit (max_images, max_video_seconds, max_input_characters, max_audio_seconds; common.catalog's
# defaults where the catalog names none): router_svc refuses more, and refuses anything that
# would cost more than the hold.

PARTIAL_HEADER = "x-envoy-auth-partial-body"
_HEAD_BYTES = 64 * 1024
_VARINT_BYTES_MAX = 10


@dataclasses.dataclass(frozen=True)
class MediaCall:
    """What a media call's worst case depends on, read from its body.

    `kind` is the model type the method serves. `requested` is n (images), seconds (video)
    or characters (speech); None when absent, and a huge value when unreadable. For a
    transcription, `audio_head` is the file's first bytes and `upload_bytes` its size (an
    upper bound when only the form's first bytes were seen).
    """

    model: str
    kind: str
    requested: int | None = None
    audio_head: bytes = b""
    upload_bytes: int = 0


def worst_media_units(call: MediaCall, model: catalog.Model) -> domain.Units:
    limits = model.limits
    if call.kind == "image":
        n = 1 if call.requested is None else call.requested
        return domain.Units(images=min(max(n, 1), limits.get("max_images", catalog.IMAGES_MAX)))
    if call.kind == "video":
        default = int(model.options.get("default_seconds", catalog.VIDEO_SECONDS_DEFAULT))
        seconds = default if call.requested is None else call.requested
        longest = limits.get("max_video_seconds", catalog.VIDEO_SECONDS_MAX)
        return domain.Units(video_ms=1000 * min(max(seconds, 1), longest))
    if call.kind == "tts":
        return domain.Units(characters=min(max(call.requested or 0, 0),
                                           limits.get("max_input_characters", catalog.CHARACTERS_MAX)))
    worst_ms, _how = audio.worst_ms(call.audio_head, call.upload_bytes)
    return domain.Units(audio_ms=min(worst_ms, 1000 * limits.get("max_audio_seconds", catalog.AUDIO_SECONDS_MAX)))


def held_header(model_id: str, kind: str, units: domain.Units) -> str:
    """x-ts-held (common.held): the units of the model's type this hold covers, what
    router_svc may produce and charge at most."""
    usage = units.as_usage()
    return held.encode(model_id, {unit: usage[unit] for unit in catalog.USAGE_UNITS[kind]})


def image_call(body: bytes) -> MediaCall:
    try:
        request = router_pb2.CreateImageRequest.FromString(body)
    except Exception:  # noqa: BLE001
        raise BodyError("the body is not an image request") from None
    return MediaCall(model=request.model, kind="image", requested=request.n if request.HasField("n") else None)


def speech_call(body: bytes) -> MediaCall:
    try:
        request = router_pb2.CreateSpeechRequest.FromString(body)
    except Exception:  # noqa: BLE001
        raise BodyError("the body is not a speech request") from None
    return MediaCall(model=request.model, kind="tts", requested=len(request.input))


def _varint(buf: bytes, position: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 7 * _VARINT_BYTES_MAX, 7):
        if position >= len(buf):
            raise BodyError("the request body ends inside a protobuf varint")
        byte = buf[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
    raise BodyError("a protobuf varint is too long")


def http_body(raw: bytes, encoding: str = "", partial: bool = False) -> tuple[str, bytes, int]:
    """(content type, data, declared data length) of a gRPC-framed google.api.HttpBody.

    With `partial`, `raw` may be only the first bytes of the frame (Envoy's
    allow_partial_message): the data is then a prefix of the declared length."""
    if len(raw) < 5:
        raise BodyError("the request body is not a gRPC message")
    length = int.from_bytes(raw[1:5], "big")
    if not partial or len(raw) >= 5 + length:
        payload = unframe(raw, encoding)
    elif raw[0] == 0:
        payload = raw[5:]
    elif raw[0] == 1 and encoding in ("gzip", "deflate"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            payload = inflater.decompress(raw[5:], _HEAD_BYTES * 4)
        except zlib.error:
            raise BodyError("the compressed gRPC message is corrupt") from None
    else:
        raise BodyError("the gRPC frame has an unknown flag or encoding")
    content_type, data, declared, position = "", b"", 0, 0
    while position < len(payload):  # ends: every step consumes at least one byte
        key, position = _varint(payload, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _value, position = _varint(payload, position)
            continue
        if wire != 2:
            raise BodyError("the body is not a google.api.HttpBody")
        size, position = _varint(payload, position)
        value = payload[position:position + size]
        if field == 1:
            content_type = value.decode("utf-8", "replace")
        elif field == 2:
            data, declared = value, size
        position += size
    return content_type, data, declared


def _fields(content_type: str, data: bytes, partial: bool) -> multipart.Form:
    """The fields of a form or JSON body (JSON values as given)."""
    try:
        form = multipart.read(data, content_type, partial=partial, untyped_is_json=True)
    except multipart.NotAnObject as error:
        raise BodyError(str(error)) from None
    except ValueError as error:
        raise BodyError(f"the body cannot be read: {errors.echo(error)}") from None
    if form is None:
        raise BodyError("the body must be multipart/form-data or JSON")
    return form


def _whole_number(value) -> int | None:
    """A count from JSON or a form; a value that is not a whole number is taken as huge."""
    if value is None:
        return None
    if isinstance(value, list):
        value = value[-1] if value else None
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 9:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return 2**31


def video_call(raw: bytes, encoding: str = "", partial: bool = False) -> MediaCall:
    content_type, data, _declared = http_body(raw, encoding, partial)
    form = _fields(content_type, data, partial)
    model = form.fields.get("model")
    return MediaCall(model=model if isinstance(model, str) else "", kind="video",
                     requested=_whole_number(form.fields.get("seconds")))


def transcription_call(raw: bytes, encoding: str = "", partial: bool = False) -> MediaCall:
    """The model and the file's first bytes and size, from (the first bytes of) the form."""
    content_type, data, declared = http_body(raw, encoding, partial)
    try:
        form = multipart.parse(data, content_type, partial=len(data) < declared)
    except multipart.FormError as error:
        raise BodyError(f"the form cannot be read: {errors.echo(error)}") from None
    model = form.text("model") or ""
    upload = form.files.get("file")
    if upload is None:
        if form.truncated:
            raise errors.InvalidRequest("The form's fields before 'file' must fit in its first 64 KiB.",
                                        param="file", code="invalid_form")
        return MediaCall(model=model, kind="stt")
    # The file runs to the end of the form at most (the closing line, CRLF included, as every
    # client writes it), so this is its size, or more when fields follow it.
    closing = len(b"\r\n--") + len(multipart.boundary(content_type)) + len(b"--\r\n")
    size = len(upload.data) if upload.complete else declared - upload.offset - closing
    if size > audio.UPLOAD_BYTES_MAX:
        raise UploadTooLarge(f"The file is larger than {audio.UPLOAD_BYTES_MAX} bytes (25 MB).", param="file")
    return MediaCall(model=model, kind="stt", audio_head=bytes(upload.data[:_HEAD_BYTES]), upload_bytes=size)


PARSERS = {**{INFERENCE + m: chat_call for m in CHAT_METHODS},
           **{INFERENCE + m: completion_call for m in COMPLETION_METHODS},
           INFERENCE + "CreateImage": image_call, INFERENCE + "CreateSpeech": speech_call}
# Methods whose body is a google.api.HttpBody (a form or JSON), perhaps only its first bytes.
UPLOAD_PARSERS = {INFERENCE + "CreateVideo": video_call, INFERENCE + "CreateTranscription": transcription_call}
FREE_PATHS = frozenset(INFERENCE + m for m in FREE_METHODS)
_ALLOW = authz.allow()


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):
    """envoy.service.auth.v3.Authorization/Check."""

    def __init__(self, store: store_mod.Store, models: catalog.Catalog, clock: domain.Clock,
                 public_base_url: str) -> None:
        self._store = store
        self._catalog = models
        self._clock = clock
        self._message_402 = config.insufficient_credit_message(public_base_url)
        self._body_402 = config.insufficient_credit_body(public_base_url)

    async def Check(self, request, context):
        http = request.attributes.request.http
        headers = http.headers if http.headers or not http.header_map.headers else _header_map(http)
        parse = PARSERS.get(http.path) or UPLOAD_PARSERS.get(http.path)
        if parse is None:
            if http.path.startswith(INFERENCE) and http.path not in FREE_PATHS:
                metrics.REFUSED.inc()
                return authz.deny(errors.NotFound("This method cannot be priced, so it is not served.",
                                                  code="unknown_method"), _caller(headers))
            metrics.FREE.inc()
            return _ALLOW
        try:
            call, model = self._read(parse, http, headers)
        except errors.ApiError as refusal:
            metrics.REFUSED.inc()
            return authz.deny(refusal, _caller(headers))
        price = self._store.price_book.current(model.id, self._clock() // 1000)
        if price is None:
            raise errors.Unavailable("the model has no price yet", code="price_missing")
        media = isinstance(call, MediaCall)
        units = worst_media_units(call, model) if media else domain.worst_text_units(call, model.limits)
        amount = domain.worst_cost_nanos(price.prices, units)
        account_id = headers.get("x-ts-account", "")
        hold = domain.HoldRequest(hold_id=os.urandom(16).hex(), account_id=account_id,
                                  key_id=headers.get("x-ts-key", "")[:128], model=model.id,
                                  request_id=headers.get("x-request-id", "")[:domain.REQUEST_ID_LENGTH_MAX],
                                  prices=price.prices, price_version=price.version, amount_nanos=amount,
                                  prices_header=price.header)
        try:
            decision = await self._store.hold(hold)
        except Exception as error:  # noqa: BLE001 - whatever it was, the call is not let through
            metrics.DATABASE_ERRORS.inc()
            log.warning("hold failed", extra={"error": repr(error)})
            raise errors.Unavailable("the ledger cannot hold credit right now") from None
        if decision.result.admitted:
            metrics.ADMITTED.inc()
            held_units = held_header(model.id, call.kind if media else "text", units)
            return authz.allow([authz.header("x-ts-hold", decision.hold_id), authz.header("x-ts-price", price.header),
                                authz.header(held.HEADER, held_units)])
        if decision.result is domain.HoldResult.INSUFFICIENT_CREDIT:
            metrics.INSUFFICIENT.inc()
            return authz.deny(InsufficientCredit(self._message_402, account_id), _caller(headers),
                              http_status=402, body=self._body_402)
        metrics.REFUSED.inc()
        return authz.deny(errors.PermissionDenied("This account has no credit account; contact support.",
                                                  code="account_not_open"), _caller(headers))

    def _read(self, parse, http, headers) -> tuple[domain.TextCall | MediaCall, catalog.Model]:
        """The billable call in the body and its model; an ApiError for anything that cannot be held."""
        if not headers.get("x-ts-account", ""):
            raise errors.Unauthenticated("This call needs an API key.")
        encoding = headers.get("grpc-encoding", "")
        try:
            if http.path in UPLOAD_PARSERS:
                call = parse(http.raw_body, encoding, headers.get(PARTIAL_HEADER) == "true")
            else:
                call = parse(unframe(http.raw_body, encoding))
        except BodyTooLarge as error:
            raise errors.PayloadTooLarge(str(error)) from None
        except BodyError as error:
            raise errors.InvalidRequest(str(error), code="invalid_body") from None
        kind = call.kind if isinstance(call, MediaCall) else "text"
        model = self._catalog.get(call.model)
        if model is None and kind == "stt" and not call.model:
            model = self._priciest("stt")
        if model is None:
            raise UnknownModel(f"The model `{errors.echo(call.model)}` does not exist or you do not have access to it.",
                               param="model")
        if model.type != kind:
            article = "an" if kind[0] in "aeiou" else "a"
            raise errors.InvalidRequest(f"The model `{errors.echo(call.model)}` is not {article} {kind} model.", param="model",
                                        code="model_not_supported")
        if isinstance(call, domain.TextCall) and call.parts:
            call = dataclasses.replace(call, part_tokens=part_tokens(call.parts, model))
        return call, model

    def _priciest(self, kind: str) -> catalog.Model | None:
        """A transcription whose form put 'model' after a file larger than the part of it
        this filter reads is held as the most expensive model of its type; router_svc then
        refuses it unless it names that very model (x-ts-held says which)."""
        now_s = self._clock() // 1000
        best, best_price = None, -1
        for model in self._catalog.models.values():
            price = self._store.price_book.current(model.id, now_s) if model.type == kind else None
            if price is not None and sum(price.prices.values()) > best_price:
                best, best_price = model, sum(price.prices.values())
        return best
