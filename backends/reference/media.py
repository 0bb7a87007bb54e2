"""Shared pieces of the media modules: the input error, field readers, a bounded LRU, ffmpeg."""

import collections
import functools
import math
from collections.abc import Mapping

import imageio_ffmpeg


class Invalid(ValueError):
    """Input a media route refuses; the HTTP layer turns it into OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status
        self.kind = kind


@functools.cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg, looked up on first use."""
    return imageio_ffmpeg.get_ffmpeg_exe()


# Fields come from JSON (typed values) or from a multipart form (always strings), so the
# readers accept a number's decimal string too. A null counts as absent, as OpenAI treats it.


def string(fields: Mapping, name: str, chars_max: int, default: str | None = None,
           empty_ok: bool = False) -> str:
    """A string field; with no default it is required."""
    value = fields.get(name)
    if value is None:
        if default is None:
            raise Invalid(f"'{name}' is required.", name)
        return default
    if not isinstance(value, str) or (not value and not empty_ok) or len(value) > chars_max:
        low = 0 if empty_ok else 1
        raise Invalid(f"'{name}' must be a string of {low} to {chars_max} characters.", name)
    return value


def choice(fields: Mapping, name: str, options: Mapping | tuple, default: str | None) -> str:
    """One of a fixed set of strings; with no default it is required."""
    value = fields.get(name)
    if value is None and default is not None:
        return default
    if not isinstance(value, str) or value not in options:
        raise Invalid(f"'{name}' must be one of: {', '.join(options)}.", name,
                      "invalid_value")
    return value


def number(fields: Mapping, name: str, low: float, high: float, default: float) -> float:
    value = fields.get(name)
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not low <= value <= high):
        raise Invalid(f"'{name}' must be a number between {low:g} and {high:g}.", name,
                      "invalid_value")
    return float(value)


def integer(fields: Mapping, name: str, low: int, high: int, default: int) -> int:
    value = fields.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Invalid(f"'{name}' must be an integer between {low} and {high}.", name,
                      "invalid_value")
    return value


def flag(fields: Mapping, name: str) -> bool:
    """A boolean, also given as "true"/"false" in a form."""
    value = fields.get(name)
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    if value is None or isinstance(value, bool):
        return bool(value)
    raise Invalid(f"'{name}' must be a boolean.", name, "invalid_value")


class Lru:
    """Byte strings by key, dropping the least recently used past a count or a byte total."""

    def __init__(self, items_max: int, bytes_max: int) -> None:
        self._items: collections.OrderedDict[object, bytes] = collections.OrderedDict()
        self._items_max = items_max
        self._bytes_max = bytes_max
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: object) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: object, value: bytes) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        self._items[key] = value
        self._bytes += len(value)
        # Bounded: each pass drops one item, and the newest one always stays.
        while len(self._items) > 1 and (len(self._items) > self._items_max
                                        or self._bytes > self._bytes_max):
            _, dropped = self._items.popitem(last=False)
            self._bytes -= len(dropped)
