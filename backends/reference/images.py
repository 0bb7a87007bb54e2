"""Deterministic PNG images for the reference backend: hashed colour tiles with the prompt on top.

An image depends only on (model, prompt, index): the tile colours and layout come from a
BLAKE2b digest of them, and the requested size only scales the picture. Images are palette
PNGs (mode "P", 8 bits per pixel) with exactly the requested width and height; large flat
tiles make them cheap to draw and to compress.
"""

import dataclasses
import functools
import hashlib
import io
import textwrap
from collections.abc import Mapping

from PIL import Image, ImageDraw, ImageFont

from backends.reference import media

SIZES = {"256x256": (256, 256), "512x512": (512, 512), "1024x1024": (1024, 1024),
         "1792x1024": (1792, 1024), "1024x1792": (1024, 1792)}
SIZE_DEFAULT = "1024x1024"
N_MAX = 10
PROMPT_CHARS_MAX = 32_000  # gpt-image-1's limit; dall-e-3 takes 4000
RESPONSE_FORMATS = ("b64_json", "url")
QUALITIES = ("auto", "standard", "hd", "low", "medium", "high")
STYLES = ("vivid", "natural")
MODEL_DEFAULT = "ref-image"
_COLOURS = 16
_WHITE, _BLACK = _COLOURS, _COLOURS + 1  # palette entries for the text and its shadow
_TEXT_LINES_MAX = 2


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRequest:
    model: str
    prompt: str
    n: int
    size: str
    response_format: str


def parse(body: Mapping) -> ImageRequest:
    """The validated request; raises media.Invalid."""
    model = media.string(body, "model", 256, MODEL_DEFAULT)
    prompt = media.string(body, "prompt", PROMPT_CHARS_MAX)
    n = media.integer(body, "n", 1, N_MAX, 1)
    size = media.choice(body, "size", SIZES, SIZE_DEFAULT)
    response_format = media.choice(body, "response_format", RESPONSE_FORMATS, "b64_json")
    media.choice(body, "quality", QUALITIES, "auto")
    media.choice(body, "style", STYLES, "vivid")
    media.string(body, "user", 256, "", empty_ok=True)
    return ImageRequest(model, prompt, n, size, response_format)


def render_png(model: str, prompt: str, size: str, index: int) -> bytes:
    """The PNG bytes of image number `index` of a request; the same inputs give the same bytes."""
    width, height = SIZES[size]
    key = f"{model}\x00{index}\x00{prompt}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(key, digest_size=64).digest()
    columns, rows = 4 + digest[48] % 8, 3 + digest[49] % 6
    step, shift = 1 + digest[50] % 7, digest[51]
    # One pixel per tile, scaled up with NEAREST: C code fills the big image.
    tiles = bytes((row + column * step + shift) % _COLOURS
                  for row in range(rows) for column in range(columns))
    image = Image.frombytes("P", (columns, rows), tiles).resize((width, height),
                                                               Image.Resampling.NEAREST)
    image.putpalette(list(digest[:3 * _COLOURS]) + [255, 255, 255, 0, 0, 0])
    _caption(image, prompt, index)
    out = io.BytesIO()
    # Level 1 is several times faster than the default, and flat tiles still shrink well.
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def _caption(image: Image.Image, prompt: str, index: int) -> None:
    """The prompt's first lines in white on a black band; glyph rendering is most of the cost."""
    width, height = image.size
    font_px = max(12, width // 40)
    font = _font(font_px)
    lines = textwrap.wrap(prompt, width=max(8, (width * 8 // 10) // (font_px // 2 + 1)),
                          max_lines=_TEXT_LINES_MAX, placeholder=" ...") or [""]
    line_px = font_px * 5 // 4
    x, y = width // 20, height // 20
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, y - font_px // 4, width, y + line_px * len(lines)), fill=_BLACK)
    draw.text((x, y), "\n".join(lines), fill=_WHITE, font=font, spacing=line_px - font_px)
    label = f"#{index}"
    draw.text((width - width // 20 - font_px * len(label), height - height // 20 - font_px),
              label, fill=_WHITE, font=font)


@functools.cache  # one font per image width: a handful at most
def _font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size_px)
