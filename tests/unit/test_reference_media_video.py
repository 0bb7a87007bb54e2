"""The video module: real H.264 MP4s of exactly the seconds asked, and the job queue."""

import asyncio
import os
import re
import subprocess
import tempfile

import pytest

from backends.reference import media, video


def _probe(mp4: bytes) -> dict:
    """What ffmpeg finds in the file: its container duration, and the frames it decodes."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.mp4")
        with open(path, "wb") as out:
            out.write(mp4)
        done = subprocess.run([media.ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", path,
                               "-f", "null", "-"], capture_output=True, timeout=60, check=True)
    log = done.stderr.decode()
    hours, minutes, seconds = re.search(r"Duration: (\d+):(\d+):([\d.]+),", log).groups()
    stream = re.search(r"Video: (\w+).*?, (\d+)x(\d+)", log)
    return {"duration_s": int(hours) * 3600 + int(minutes) * 60 + float(seconds),
            "frames": int(re.findall(r"frame=\s*(\d+)", log)[-1]), "codec": stream.group(1),
            "size": (int(stream.group(2)), int(stream.group(3))),
            "fps": float(re.search(r"([\d.]+) fps", log).group(1))}


@pytest.mark.parametrize(("seconds", "size"), [(4, "720x1280"), (8, "1280x720"),
                                               (12, "1792x1024"), (1, "1024x1792")])
async def test_clip_is_an_h264_mp4_of_exactly_the_seconds_asked(seconds, size):
    request = video.VideoRequest("sora-2", "waves on a beach", seconds, size)
    mp4 = await video.render_mp4(request)
    assert mp4[4:8] == b"ftyp"
    found = _probe(mp4)
    assert found["codec"] == "h264" and found["fps"] == video.FPS
    assert found["frames"] == seconds * video.FPS
    assert found["duration_s"] == seconds
    width, height = video.SIZES[size]
    assert found["size"] == video.frame_size(size) == (width // 8, height // 8)


async def test_clip_is_deterministic_and_progress_climbs_to_99():
    request = video.VideoRequest("sora-2", "a kite", 3, "1280x720")
    seen: list[int] = []
    first = await video.render_mp4(request, seen.append)
    assert await video.render_mp4(request) == first
    assert seen == sorted(seen) and seen[-1] == 99 and len(seen) == 3
    other = await video.render_mp4(video.VideoRequest("sora-2", "a kite!", 3, "1280x720"))
    assert other != first


def test_frames_are_packed_rgb_of_the_reduced_size_and_move():
    request = video.VideoRequest("m", "p", 1, "720x1280")
    width, height = video.frame_size("720x1280")
    two = video.frames(request, 0, 2)
    assert len(two) == 2 * width * height * 3
    assert two[:len(two) // 2] != two[len(two) // 2:]
    assert video.frames(request, 1, 1) == two[len(two) // 2:]  # a frame depends on its number only


async def test_fail_mark_fails_the_render():
    with pytest.raises(video.RenderError) as caught:
        await video.render_mp4(video.VideoRequest("m", "please [[fail]] now", 4, "720x1280"))
    assert caught.value.code == "video_generation_failed"


def test_parse_takes_openai_strings_and_whole_numbers():
    assert video.parse({"prompt": "p"}) == video.VideoRequest("ref-video", "p", 4, "720x1280")
    for given, seconds in (("4", 4), ("8", 8), ("12", 12), (1, 1), (20, 20), ("20", 20)):
        assert video.parse({"prompt": "p", "seconds": given}).seconds == seconds
    ask = video.parse({"model": "sora-2-pro", "prompt": "p", "size": "1792x1024"})
    assert (ask.model, ask.size) == ("sora-2-pro", "1792x1024")


@pytest.mark.parametrize(("change", "param"), [
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"seconds": 0}, "seconds"),
    ({"seconds": 21}, "seconds"),
    ({"seconds": "0"}, "seconds"),
    ({"seconds": "4.5"}, "seconds"),
    ({"seconds": 4.0}, "seconds"),
    ({"seconds": True}, "seconds"),
    ({"seconds": "four"}, "seconds"),
    ({"size": "640x480"}, "size"),
    ({"model": ""}, "model"),
])
def test_parse_refuses_bad_input_naming_the_field(change, param):
    fields = {k: v for k, v in {"prompt": "p", **change}.items() if v is not None}
    with pytest.raises(media.Invalid) as caught:
        video.parse(fields)
    assert caught.value.param == param and caught.value.status == 400


async def _settle(jobs: video.Jobs, *ids: str) -> None:
    for _ in range(600):  # 30 s at most
        if all(jobs.get(i).finished for i in ids):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("jobs did not finish")


async def test_jobs_go_from_queued_to_completed_or_failed_and_report_once():
    finished: list[video.Job] = []
    jobs = video.Jobs(finished.append)
    try:
        good = jobs.create(video.VideoRequest("sora-2", "a road", 2, "1280x720"))
        bad = jobs.create(video.VideoRequest("sora-2", "a road [[fail]]", 8, "1280x720"))
        assert good.to_json()["status"] == "queued" and good.to_json()["progress"] == 0
        assert good.id.startswith("video_") and good.id != bad.id
        await _settle(jobs, good.id, bad.id)
    finally:
        await jobs.close()
    done = good.to_json()
    assert (done["status"], done["progress"], done["seconds"], done["size"]) == (
        "completed", 100, "2", "1280x720")
    assert done["completed_at"] >= done["created_at"] and done["error"] is None
    assert _probe(good.content)["frames"] == 2 * video.FPS
    failed = bad.to_json()
    assert failed["status"] == "failed" and bad.content is None
    assert failed["error"]["code"] == "video_generation_failed" and failed["error"]["message"]
    assert sorted(job.id for job in finished) == sorted([good.id, bad.id])


async def test_jobs_are_bounded_pending_and_kept(monkeypatch):
    monkeypatch.setattr(video, "PENDING_MAX", 2)
    monkeypatch.setattr(video, "JOBS_MAX", 3)
    jobs = video.Jobs(lambda job: None)
    try:
        first = jobs.create(video.VideoRequest("m", "one", 1, "720x1280"))
        second = jobs.create(video.VideoRequest("m", "two", 1, "720x1280"))
        with pytest.raises(media.Invalid) as caught:  # the renders have not started yet
            jobs.create(video.VideoRequest("m", "three", 1, "720x1280"))
        assert caught.value.status == 429
        await _settle(jobs, first.id, second.id)
        third = jobs.create(video.VideoRequest("m", "three", 1, "720x1280"))
        await _settle(jobs, third.id)
        fourth = jobs.create(video.VideoRequest("m", "four", 1, "720x1280"))
        assert jobs.get(first.id) is None  # the oldest finished job made room
        assert [jobs.get(j.id) is j for j in (second, third, fourth)] == [True] * 3
    finally:
        await jobs.close()
