"""The transcription module: exact durations from real decodes, refusals, output formats."""

import io
import json
import os
import subprocess
import tempfile

import numpy as np
import pytest
import soundfile

from backends.reference import media, transcription

RATE = 24_000


def _tone(seconds: float, rate: int = RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave


def _soundfile_bytes(container: str, subtype: str, seconds: float = 30.0, rate: int = RATE,
                     channels: int = 1) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, _tone(seconds, rate, channels), rate, format=container, subtype=subtype)
    return out.getvalue()


def _ffmpeg_bytes(codec: str, muxer: str, seconds: float = 30.0) -> bytes:
    """Audio in a container libsndfile cannot read (the file must be seekable for mp4)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "out")
        subprocess.run([media.ffmpeg_exe(), "-nostdin", "-v", "error", "-f", "f32le",
                        "-ar", str(RATE), "-ac", "1", "-i", "pipe:0", "-c:a", codec, "-f", muxer,
                        path], input=_tone(seconds).tobytes(), check=True, timeout=60)
        with open(path, "rb") as made:
            return made.read()


def _request(response_format: str = "json", words: bool = False
             ) -> transcription.TranscriptionRequest:
    return transcription.TranscriptionRequest("whisper-1", "en", "", response_format, 0.0, words)


# (container, subtype, rate, the codec's frame in samples: the tolerance of "within one frame")
SOUNDFILE_CASES = [
    ("WAV", "PCM_16", RATE, 1), ("WAV", "FLOAT", 44_100, 1), ("FLAC", "PCM_16", 48_000, 1),
    ("OGG", "VORBIS", RATE, 1), ("OGG", "OPUS", RATE, 960), ("MP3", "MPEG_LAYER_III", RATE, 1152),
    ("MP3", "MPEG_LAYER_III", 44_100, 1152)]


@pytest.mark.parametrize(("container", "subtype", "rate", "frame"), SOUNDFILE_CASES)
def test_30_s_files_libsndfile_reads_report_30_s(container, subtype, rate, frame):
    decoded = transcription.decode(_soundfile_bytes(container, subtype, rate=rate))
    assert decoded.decoder == "soundfile" and decoded.sample_rate == rate
    assert abs(decoded.frames - 30 * rate) <= frame
    assert abs(decoded.seconds - 30.0) <= frame / rate
    if frame == 1:
        assert decoded.seconds == 30.0


def test_stereo_counts_frames_not_samples():
    decoded = transcription.decode(_soundfile_bytes("WAV", "PCM_16", 12.5, 48_000, channels=2))
    assert decoded.frames == 12.5 * 48_000 and decoded.seconds == 12.5


@pytest.mark.parametrize(("codec", "muxer", "frame"), [
    ("aac", "ipod", 1024),  # .m4a
    ("libopus", "webm", 960),
])
def test_containers_only_ffmpeg_reads_report_30_s(codec, muxer, frame):
    decoded = transcription.decode(_ffmpeg_bytes(codec, muxer))
    assert decoded.decoder == "ffmpeg"
    assert abs(decoded.seconds - 30.0) <= frame / decoded.sample_rate


@pytest.mark.parametrize("data", [
    b"",
    b"not audio at all\n" * 200,
    np.random.default_rng(7).bytes(20_000),
    bytes(20_000),
    b"RIFF\x24\x00\x00\x00WAVEfmt ",  # a WAV header cut short
    b"\x89PNG\r\n\x1a\n" + bytes(200),
    b"#EXTM3U\n#EXTINF:10,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n",  # must not be followed
    b"ffconcat version 1.0\nfile '/etc/hostname'\n",
])
def test_what_does_not_decode_is_invalid_file(data):
    with pytest.raises(media.Invalid) as caught:
        transcription.decode(data)
    assert caught.value.code == "invalid_file" and caught.value.param == "file"
    assert caught.value.status == 400


def test_audio_under_a_tenth_of_a_second_is_too_short():
    with pytest.raises(media.Invalid) as caught:
        transcription.decode(_soundfile_bytes("WAV", "PCM_16", 0.05))
    assert caught.value.code == "audio_too_short"
    assert transcription.decode(_soundfile_bytes("WAV", "PCM_16", 0.1)).seconds == 0.1


@pytest.mark.parametrize("data", [
    pytest.param(lambda: _soundfile_bytes("FLAC", "PCM_16", 12.0), id="soundfile"),
    pytest.param(lambda: _ffmpeg_bytes("aac", "ipod", 12.0), id="ffmpeg"),
])
def test_decoding_stops_past_the_duration_bound(monkeypatch, data):
    monkeypatch.setattr(transcription, "DURATION_S_MAX", 10)
    with pytest.raises(media.Invalid) as caught:
        transcription.decode(data())
    assert caught.value.code == "audio_too_long"


def test_transcript_is_deterministic_says_the_duration_and_follows_the_samples():
    audio = _soundfile_bytes("WAV", "PCM_16", 30.0)
    body, content_type = transcription.render(_request(), transcription.decode(audio))
    again, _ = transcription.render(_request(), transcription.decode(audio))
    assert content_type == "application/json" and body == again
    payload = json.loads(body)
    assert payload["text"].startswith("Audio of 30.000 seconds. ")
    assert payload["usage"] == {"type": "duration", "seconds": 30.0}
    assert len(payload["text"].split()) == 4 + 30 * transcription.WORDS_PER_S
    quieter = io.BytesIO()  # the same length, other samples: other words
    soundfile.write(quieter, _tone(30.0) * 0.5, RATE, format="WAV", subtype="PCM_16")
    different, _ = transcription.render(_request(), transcription.decode(quieter.getvalue()))
    assert json.loads(different)["text"] != payload["text"]
    assert json.loads(different)["text"].startswith("Audio of 30.000 seconds. ")


def test_verbose_json_has_duration_language_segments_and_words():
    decoded = transcription.decode(_soundfile_bytes("WAV", "PCM_16", 75.0))
    body, _ = transcription.render(_request("verbose_json", words=True), decoded)
    payload = json.loads(body)
    assert payload["duration"] == 75.0 and payload["language"] == "english"
    assert payload["task"] == "transcribe"
    assert [(s["start"], s["end"]) for s in payload["segments"]] == [(0, 30), (30, 60), (60, 75)]
    assert [s["id"] for s in payload["segments"]] == [0, 1, 2]
    assert "".join(s["text"] for s in payload["segments"]).strip() == payload["text"]
    assert payload["words"][0]["word"] == "Audio" and payload["words"][-1]["end"] == 75.0
    assert payload["usage"] == {"type": "duration", "seconds": 75.0}
    plain, _ = transcription.render(_request("verbose_json"), decoded)
    assert "words" not in json.loads(plain)


def test_text_srt_and_vtt_are_plain_text_with_the_segments():
    decoded = transcription.decode(_soundfile_bytes("WAV", "PCM_16", 61.5))
    text, content_type = transcription.render(_request("text"), decoded)
    assert content_type.startswith("text/plain") and text.decode().startswith("Audio of 61.500")
    srt, _ = transcription.render(_request("srt"), decoded)
    assert srt.decode().splitlines()[:2] == ["1", "00:00:00,000 --> 00:00:30,000"]
    assert "3\n00:01:00,000 --> 00:01:01,500\n" in srt.decode()
    vtt, _ = transcription.render(_request("vtt"), decoded)
    assert vtt.decode().startswith("WEBVTT\n\n00:00:00.000 --> 00:00:30.000\nAudio of 61.500")


def test_parse_reads_form_strings_and_applies_defaults():
    ask = transcription.parse({"model": "whisper-1"})
    assert ask == transcription.TranscriptionRequest("whisper-1", "en", "", "json", 0.0, False)
    ask = transcription.parse({"model": "whisper-1", "language": "de", "prompt": "p",
                               "response_format": "verbose_json", "temperature": "0.4",
                               "timestamp_granularities[]": ["word", "segment"],
                               "stream": "false"})
    assert (ask.language, ask.temperature, ask.word_timestamps) == ("de", 0.4, True)


@pytest.mark.parametrize(("change", "param"), [
    ({"model": None}, "model"),
    ({"model": ""}, "model"),
    ({"response_format": "xml"}, "response_format"),
    ({"temperature": "1.5"}, "temperature"),
    ({"temperature": "warm"}, "temperature"),
    ({"language": "english"}, "language"),
    ({"language": "E1"}, "language"),
    ({"stream": "true"}, "stream"),
    ({"timestamp_granularities[]": "char"}, "timestamp_granularities"),
    ({"prompt": ["a", "b"]}, "prompt"),
])
def test_parse_refuses_bad_fields_naming_them(change, param):
    fields = {k: v for k, v in {"model": "whisper-1", **change}.items() if v is not None}
    with pytest.raises(media.Invalid) as caught:
        transcription.parse(fields)
    assert caught.value.param == param and caught.value.status == 400
