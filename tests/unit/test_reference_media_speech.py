"""The reference backend's speech module: real audio in every format, its length set by the rule."""

import io

import numpy as np
import pytest
import soundfile

from backends.reference import media, speech
from tests import audio

TEXT = "Hello there, this is the reference voice speaking."


def _request(text: str = TEXT, response_format: str = "wav", speed: float = 1.0,
             voice: str = "alloy", model: str = "tts-1") -> speech.SpeechRequest:
    return speech.SpeechRequest(model, text, voice, response_format, speed, "")


@pytest.mark.parametrize(("characters", "speed", "samples"), [
    (1, 1.0, 1440),  # 60 ms at 24 kHz
    (50, 1.0, 72_000),  # 3 s
    (10, 2.0, 7200),
    (10, 0.25, 57_600),
    (3, 0.7, 6171),  # 6171.43 rounds down
    (4096, 4.0, 1_474_560),
])
def test_sample_count_follows_the_documented_rule(characters, speed, samples):
    assert speech.sample_count(characters, speed) == samples


@pytest.mark.parametrize(("response_format", "container"), [
    ("mp3", "MP3"), ("opus", "OGG"), ("flac", "FLAC"), ("wav", "WAV")])
def test_soundfile_formats_decode_to_exactly_the_rule(response_format, container):
    request = _request(response_format=response_format, speed=1.25)
    data = speech.speech(request)
    expected = speech.sample_count(len(TEXT), 1.25)
    info = soundfile.info(io.BytesIO(data))
    assert info.format == container and info.channels == 1
    assert info.samplerate == speech.SAMPLE_RATE
    samples, _ = soundfile.read(io.BytesIO(data), dtype="float32")
    assert len(samples) == expected
    assert np.abs(samples).max() > 0.1  # there is sound in it


def test_opus_is_ogg_opus():
    data = speech.speech(_request(response_format="opus"))
    assert data[:4] == b"OggS" and b"OpusHead" in data[:200]
    assert soundfile.info(io.BytesIO(data)).subtype == "OPUS"


def test_pcm_is_raw_16_bit_little_endian_at_24_khz():
    data = speech.speech(_request(response_format="pcm", speed=0.5))
    expected = speech.sample_count(len(TEXT), 0.5)
    assert len(data) == 2 * expected
    wav = speech.speech(_request(response_format="wav", speed=0.5))
    samples, _ = soundfile.read(io.BytesIO(wav), dtype="int16")
    assert np.array_equal(np.frombuffer(data, dtype="<i2"), samples)
    assert audio.ffmpeg_frames(wav, "wav") == expected  # and another decoder agrees


def test_aac_is_adts_that_ffmpeg_decodes_to_the_rule_plus_priming():
    data = speech.speech(_request(response_format="aac"))
    assert data[0] == 0xFF and data[1] & 0xF0 == 0xF0  # ADTS sync word
    expected = speech.sample_count(len(TEXT), 1.0)
    frames = audio.ffmpeg_frames(data, "aac")
    assert expected <= frames <= expected + 2048  # ADTS cannot say where the audio ends


def test_audio_is_deterministic_and_voice_and_text_matter():
    first = speech.synthesize(_request())
    assert np.array_equal(speech.synthesize(_request()), first)
    assert speech.speech(_request(response_format="flac")) == speech.speech(
        _request(response_format="flac"))
    assert not np.array_equal(speech.synthesize(_request(voice="onyx")), first)
    assert not np.array_equal(speech.synthesize(_request(text=TEXT.upper())), first)


def test_spaces_and_punctuation_are_silent():
    samples = speech.synthesize(_request(text=" ,.!  "))
    assert len(samples) == speech.sample_count(6, 1.0) and not samples.any()
    spoken = speech.synthesize(_request(text="a b"))
    third = len(spoken) // 3
    assert spoken[:third].any() and not spoken[third:2 * third].any() and spoken[2 * third:].any()


def test_parse_applies_openai_defaults():
    ask = speech.parse({"model": "tts-1", "input": "hi", "voice": "nova"})
    assert ask == speech.SpeechRequest("tts-1", "hi", "nova", "mp3", 1.0, "")
    ask = speech.parse({"model": "gpt-4o-mini-tts", "input": "x" * speech.INPUT_CHARS_MAX,
                        "voice": "verse", "response_format": "pcm", "speed": 4,
                        "instructions": "calm", "stream_format": "audio"})
    assert (ask.response_format, ask.speed, ask.instructions) == ("pcm", 4.0, "calm")


@pytest.mark.parametrize(("change", "param"), [
    ({"model": None}, "model"),
    ({"input": ""}, "input"),
    ({"input": None}, "input"),
    ({"input": "x" * (speech.INPUT_CHARS_MAX + 1)}, "input"),
    ({"voice": "robot"}, "voice"),
    ({"voice": None}, "voice"),
    ({"voice": {"id": "voice_123"}}, "voice"),
    ({"response_format": "ogg"}, "response_format"),
    ({"speed": 0.2}, "speed"),
    ({"speed": 4.5}, "speed"),
    ({"speed": "fast"}, "speed"),
    ({"speed": float("nan")}, "speed"),
    ({"speed": True}, "speed"),
    ({"instructions": 3}, "instructions"),
    ({"stream_format": "sse"}, "stream_format"),
])
def test_parse_refuses_bad_input_naming_the_field(change, param):
    body = {"model": "tts-1", "input": "hello", "voice": "alloy", **change}
    with pytest.raises(media.Invalid) as caught:
        speech.parse({k: v for k, v in body.items() if v is not None})
    assert caught.value.param == param and caught.value.status == 400
