"""Reading multipart/form-data bodies, whole (router_svc) or only their first bytes (ledger_svc).

The parts are located with bytes.find over the body and files are returned as
memoryview slices of it, so a 25 MB upload is never copied. A prefix of a body
(`partial=True`) yields every part that begins inside it; the last one may be cut
short, which its `complete` flag says. Bounded: at most PARTS_MAX parts, and a
part's headers at most HEADER_BYTES_MAX bytes.
"""
import dataclasses
import json
import re
import urllib.parse

from common import errors

PARTS_MAX = 64
HEADER_BYTES_MAX = 8 * 1024
_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class FormError(ValueError):
    """The body is not a well-formed form."""


class NotAnObject(FormError):
    """A JSON body that parsed but is not an object."""


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    # None for a text field.
    filename: str | None
    content_type: str
    data: memoryview
    # False when the body ended (a prefix) before this part did.
    complete: bool = True
    # Where the part's data starts in the body.
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class Form:
    """Text fields (a field sent twice becomes a list) and the file parts by name (first wins)."""
    fields: dict[str, str | list[str]]
    files: dict[str, Part]
    # A prefix ended before the closing boundary.
    truncated: bool = False

    def text(self, name: str) -> str | None:
        value = self.fields.get(name)
        if isinstance(value, list):
            return value[-1]
        return value


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def params(content_type: str) -> dict[str, str]:
    """The parameters of a Content-Type or Content-Disposition value, quotes removed."""
    out = {}
    for key, value in _PARAM.findall(content_type):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[key.lower()] = value
    return out


def boundary(content_type: str) -> bytes:
    if media_type(content_type) != "multipart/form-data":
        raise FormError("the body must be multipart/form-data")
    value = params(content_type).get("boundary", "")
    if not 1 <= len(value) <= 70:
        raise FormError("the multipart/form-data content type has no valid boundary")
    return value.encode("latin-1", "replace")


def parse(body: bytes | memoryview, content_type: str, *, partial: bool = False) -> Form:
    """The form in `body`; with `partial`, `body` may be only its first bytes."""
    raw = body if isinstance(body, bytes) else bytes(body)
    view = memoryview(raw)
    delimiter = b"--" + boundary(content_type)
    position = raw.find(delimiter)
    if position < 0:
        if partial:
            return Form({}, {}, truncated=True)
        raise FormError("the multipart body has no boundary line")
    fields: dict[str, str | list[str]] = {}
    files: dict[str, Part] = {}
    separator = b"\r\n" + delimiter
    for _ in range(PARTS_MAX + 1):  # ends: the closing boundary, the end of a prefix, or too many parts
        position += len(delimiter)
        if raw[position:position + 2] == b"--":
            return Form(fields, files)
        head_end = raw.find(b"\r\n\r\n", position, position + HEADER_BYTES_MAX)
        if head_end < 0:
            if partial and len(raw) - position < HEADER_BYTES_MAX:
                return Form(fields, files, truncated=True)
            raise FormError("a part of the form has no end of headers")
        if len(fields) + len(files) >= PARTS_MAX:
            raise FormError(f"the form has more than {PARTS_MAX} parts")
        name, filename, part_type = _headers(raw[position:head_end])
        start = head_end + 4
        end = _delimiter(raw, separator, start)
        complete = end >= 0
        if not complete:
            if not partial:
                raise FormError("the form ends before its closing boundary")
            end = len(raw)
        data = view[start:end]
        if filename is not None:
            files.setdefault(name, Part(name, filename, part_type, data, complete, start))
        elif complete:
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                raise FormError(f"form field '{errors.echo(name)}' is not UTF-8 text") from None
            held = fields.get(name)
            fields[name] = text if held is None else [*(held if isinstance(held, list) else [held]), text]
        if not complete:
            return Form(fields, files, truncated=True)
        position = end + 2
    raise FormError(f"the form has more than {PARTS_MAX} parts")


def _delimiter(raw: bytes, separator: bytes, start: int) -> int:
    """Where the part starting at `start` ends: CRLF, "--" and the boundary, then CRLF, "--"
    or transport padding; a longer line that merely begins like it is data."""
    end = raw.find(separator, start)
    while end >= 0:  # ends: each miss moves past the previous match
        after = raw[end + len(separator):end + len(separator) + 2]
        if after in (b"\r\n", b"--") or after[:1] in (b" ", b"\t"):
            return end
        end = raw.find(separator, end + 1)
    return -1


def _headers(block: bytes) -> tuple[str, str | None, str]:
    name = filename = None
    part_type = "application/octet-stream"
    for line in block.decode("utf-8", "replace").split("\r\n"):
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "content-disposition":
            found = params(value)
            name = found.get("name")
            filename = found.get("filename")
            if "filename*" in found and filename is None:
                filename = urllib.parse.unquote(found["filename*"].split("''", 1)[-1])
        elif key == "content-type":
            part_type = value.strip()
    if not name:
        raise FormError("a part of the form has no name")
    return name, filename, part_type


def urlencoded(body: bytes) -> dict[str, str | list[str]]:
    """An application/x-www-form-urlencoded body as fields."""
    try:
        pairs = urllib.parse.parse_qsl(bytes(body).decode("utf-8"), keep_blank_values=True,
                                       strict_parsing=False, max_num_fields=PARTS_MAX)
    except (UnicodeDecodeError, ValueError):
        raise FormError("the form body is not valid UTF-8 url-encoded text") from None
    fields: dict[str, str | list[str]] = {}
    for key, value in pairs:
        held = fields.get(key)
        fields[key] = value if held is None else [*(held if isinstance(held, list) else [held]), value]
    return fields


def read(data: bytes, content_type: str, *, partial: bool = False, untyped_is_json: bool = False) -> "Form | None":
    """A multipart or url-encoded form, or a JSON object, as fields and files (JSON values as
    given); None for any other media type (with `untyped_is_json`, a body without one is JSON).
    A body that cannot be read raises ValueError (FormError; NotAnObject for JSON that is not
    an object)."""
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        return parse(data, content_type, partial=partial)
    if kind == "application/x-www-form-urlencoded":
        return Form(urlencoded(data), {})
    if kind == "application/json" or (untyped_is_json and not kind):
        fields = json.loads(data) if data else {}
        if not isinstance(fields, dict):
            raise NotAnObject("the JSON body must be an object")
        return Form(fields, {})
    return None
