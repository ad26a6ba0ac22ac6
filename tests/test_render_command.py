"""The ``render`` command end to end: duration, fps, audio present and in sync."""

from __future__ import annotations

import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from renderers.pattern import MARKER, PatternRenderer
from worker.cli import main
from worker.inprocess_renderer import InProcessRenderer
from worker.render_job import RenderError, read_audio, render
from worker.types import AvatarSettings

SR = 24_000


def _write_wav(path: Path, samples: np.ndarray, rate: int = SR) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype(np.int16).tobytes())
    return path


def _clicks(seconds: float, at: list[float]) -> np.ndarray:
    """Quiet noise with loud 5 ms clicks at the given times."""
    rng = np.random.default_rng(1)
    audio = (rng.standard_normal(int(seconds * SR)) * 300).astype(np.int16)
    for t in at:
        i = int(t * SR)
        audio[i : i + SR // 200] = 30_000
    return audio


def _decode(path: Path):
    with av.open(str(path)) as c:
        vstream = c.streams.video[0]
        fps = float(vstream.average_rate)
        frames = [
            (float(f.pts * f.time_base), f.to_ndarray(format="gray")) for f in c.decode(video=0)
        ]
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
        rate = c.streams.audio[0].rate
    return fps, frames, audio, rate


def test_render_writes_synced_mp4(tmp_path: Path) -> None:
    clicks_at = [0.5, 1.3, 2.1]
    wav = _write_wav(tmp_path / "in.wav", _clicks(2.6, clicks_at))
    out = tmp_path / "out.mp4"
    rc = main(
        [
            "render",
            "--audio",
            str(wav),
            "--out",
            str(out),
            "--renderer",
            "pattern",
            "--in-process",
            "--speed",
            "4",
            "-q",
            "--width",
            "256",
            "--height",
            "256",
        ]
    )
    assert rc == 0
    fps, frames, audio, rate = _decode(out)
    assert fps == pytest.approx(25)
    assert rate == SR
    # Duration matches the input within one frame, for both streams.
    assert abs(len(audio) / rate - 2.6) < 1 / 25 + 1024 / rate  # AAC priming/padding
    last_video = frames[-1][0] + 1 / 25
    assert abs(last_video - 2.6) <= 1 / 25 + 1e-6
    # Audio present: the clicks are where they were in the input.
    loud = np.flatnonzero(np.abs(audio) > 0.5)
    gaps = np.flatnonzero(np.diff(loud) > rate // 10)
    onsets = [loud[0] / rate] + [loud[i + 1] / rate for i in gaps]
    assert len(onsets) == 3
    assert np.allclose(onsets, clicks_at, atol=0.03)
    # In sync: the marker flashes in the video frame whose time span holds the click.
    flashes = [t for t, img in frames if img[: MARKER // 2, : MARKER // 2].mean() > 128]
    for click in onsets:
        shown = [t for t in flashes if t - 1e-6 <= click < t + 1 / 25 + 1e-6]
        assert shown, f"no flash for the click at {click}s; flashes at {flashes}"


def test_render_rejects_unreadable_audio(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wave file")
    rc = main(["render", "--audio", str(bad), "--out", str(tmp_path / "o.mp4"), "-q"])
    assert rc == 2
    assert "cannot read audio" in capsys.readouterr().err


def test_read_audio_resamples_to_24k(tmp_path: Path) -> None:
    tone = (np.sin(np.arange(16_000) / 16_000 * 2 * np.pi * 200) * 10_000).astype(np.int16)
    pcm = read_audio(_write_wav(tmp_path / "t.wav", tone, rate=16_000))
    assert abs(len(pcm) - SR) <= 64
    with pytest.raises(RenderError, match="not found"):
        read_audio(tmp_path / "missing.wav")


class _SlowPattern(PatternRenderer):
    """Slower than real time: 60 ms a frame against a 40 ms budget."""

    def render(self, jobs):
        time.sleep(0.06 * len(jobs))
        return super().render(jobs)


async def test_render_waits_for_a_slow_renderer_instead_of_stalling(tmp_path: Path) -> None:
    audio = _clicks(1.2, [0.3, 0.9])
    renderer = InProcessRenderer(_SlowPattern(64, 64, max_batch=1))
    report = await render(
        audio, tmp_path / "slow.mp4", renderer, settings=AvatarSettings(64, 64), speed=2
    )
    assert report.stalls == 0
    assert report.output_seconds == pytest.approx(1.2, abs=1 / 25)
    assert report.video_frames == pytest.approx(30, abs=1)
    assert report.ack == (pytest.approx(1.2), False)


# -- user errors: one line, exit 2, before any renderer starts; the traceback only with -v


def _user_error(tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    started = time.monotonic()
    rc = main(["render", "--out", str(tmp_path / "o.mp4"), "-q", "--width", "64", *args])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert took < 20, "the error was found only after the renderer started"
    return rc, err


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad_weights", "is not an ONNX model file"),
        ("missing_weights", "no model file at"),
        ("missing_avatar", "avatar directory not found"),
        ("not_an_avatar", "is not an avatar directory"),
        ("out_in_missing_dir", "does not exist"),
        ("out_is_a_dir", "is a directory"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, capsys, case, expected) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_text("not a model\n")
    args = {
        "bad_weights": ["--weights", str(junk)],
        "missing_weights": ["--weights", str(tmp_path / "nothing.onnx")],
        "missing_avatar": ["--avatar", str(tmp_path / "no-avatar")],
        "not_an_avatar": ["--avatar", str(tmp_path)],
        "out_in_missing_dir": ["--out", str(tmp_path / "no" / "such" / "o.mp4")],
        "out_is_a_dir": ["--out", str(tmp_path)],
    }[case]
    rc, err = _user_error(tmp_path, capsys, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err


def test_verbose_adds_the_traceback(tmp_path: Path, capsys) -> None:
    rc = main(["-v", "render", "--out", str(tmp_path / "no" / "o.mp4"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: cannot write")


async def test_render_refuses_an_unwritable_out_path_before_it_starts(tmp_path: Path) -> None:
    renderer = InProcessRenderer(PatternRenderer(64, 64, 25, SR))
    with pytest.raises(RenderError, match="does not exist"):
        await render(np.ones(SR, np.int16), tmp_path / "no" / "o.mp4", renderer)
