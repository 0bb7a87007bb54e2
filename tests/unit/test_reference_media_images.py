"""The reference backend's image module: real PNGs at the requested size, deterministic, bounded."""

import io

import pytest
from PIL import Image

from backends.reference import images, media


def _open(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every pixel: a truncated or corrupt file fails here
    return image


@pytest.mark.parametrize("size", list(images.SIZES))
def test_every_size_is_a_png_of_exactly_that_size(size):
    png = images.render_png("ref-image", "a lighthouse at dusk", size, 0)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = _open(png)
    assert image.format == "PNG"
    assert f"{image.width}x{image.height}" == size
    assert len(image.getcolors(maxcolors=256)) > 2  # tiles and caption, not a blank canvas


def test_same_inputs_give_the_same_bytes_and_each_input_matters():
    first = images.render_png("ref-image", "a red fox", "256x256", 0)
    assert images.render_png("ref-image", "a red fox", "256x256", 0) == first
    others = [images.render_png("ref-image", "a red fox", "256x256", 1),
              images.render_png("ref-image", "a red fox.", "256x256", 0),
              images.render_png("dall-e-3", "a red fox", "256x256", 0)]
    pixels = _open(first).convert("RGB").tobytes()
    assert all(_open(other).convert("RGB").tobytes() != pixels for other in others)


def test_long_and_odd_prompts_still_render():
    for prompt in ("x" * images.PROMPT_CHARS_MAX, "ünïcödé ✓ 漢字 \U0001f600", "\n\t ", "\ud800"):
        assert _open(images.render_png("m", prompt, "512x512", 3)).size == (512, 512)


def test_parse_applies_openai_defaults():
    ask = images.parse({"prompt": "a boat"})
    assert ask == images.ImageRequest("ref-image", "a boat", 1, "1024x1024", "b64_json")
    ask = images.parse({"model": "dall-e-3", "prompt": "p", "n": 10, "size": "1792x1024",
                        "response_format": "url", "quality": "hd", "style": "natural",
                        "user": "u-1"})
    assert (ask.model, ask.n, ask.size, ask.response_format) == ("dall-e-3", 10, "1792x1024",
                                                                 "url")


@pytest.mark.parametrize(("body", "param"), [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * (images.PROMPT_CHARS_MAX + 1)}, "prompt"),
    ({"prompt": "p", "n": 0}, "n"),
    ({"prompt": "p", "n": 11}, "n"),
    ({"prompt": "p", "n": True}, "n"),
    ({"prompt": "p", "n": 1.5}, "n"),
    ({"prompt": "p", "size": "300x300"}, "size"),
    ({"prompt": "p", "size": "auto"}, "size"),
    ({"prompt": "p", "response_format": "png"}, "response_format"),
    ({"prompt": "p", "quality": "ultra"}, "quality"),
    ({"prompt": "p", "style": "dark"}, "style"),
    ({"prompt": "p", "model": ""}, "model"),
    ({"prompt": "p", "user": 7}, "user"),
])
def test_parse_refuses_bad_input_naming_the_field(body, param):
    with pytest.raises(media.Invalid) as caught:
        images.parse(body)
    assert caught.value.param == param and caught.value.status == 400


def test_lru_is_bounded_by_count_and_bytes_and_keeps_recent_use():
    lru = media.Lru(items_max=3, bytes_max=10)
    for key in "abc":
        lru.put(key, b"12")
    assert lru.get("a") == b"12"  # now the most recent
    lru.put("d", b"12")
    assert lru.get("b") is None and len(lru) == 3
    lru.put("e", b"123456")  # 2 + 2 + 2 + 6 bytes: the oldest goes to get under 10
    assert lru.get("c") is None and [lru.get(k) is not None for k in "ade"] == [True, True, True]
    lru.put("big", b"x" * 50)  # larger than the bound on its own: kept alone
    assert len(lru) == 1 and lru.get("big") == b"x" * 50
