"""``scripts/bench_fps.py``: the measuring arithmetic, and a short run's JSON.

Figures are never compared with targets here (that is what the benchmark
reports); the smoke run checks the schema and that every value is sane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench.jittery import JitteryRenderer  # noqa: E402
from scripts.bench.report import summary  # noqa: E402
from scripts.bench.sessions import Trial, search  # noqa: E402
from scripts.bench.trace import Trace, analyse, speech_signal, zero_runs  # noqa: E402

FPS, SR = 25, 24_000
SECTIONS = ("env", "model", "stages", "ipc", "pacing", "sessions", "latency")


# -- the arithmetic --------------------------------------------------------------------


def test_zero_runs_counts_only_gaps_inside_the_sound() -> None:
    pcm = np.array([0, 0, 5, 0, 0, 0, 7, 0, 8, 0, 0, 9, 0, 0], np.int16)
    # Leading and trailing zeros are outside; the single zero is below the minimum run.
    assert zero_runs(pcm) == (2, 5)
    assert zero_runs(pcm, min_run=1) == (3, 6)
    assert zero_runs(np.zeros(10, np.int16)) == (0, 0)


def test_speech_signal_never_holds_a_zero() -> None:
    pcm = speech_signal(2.0, SR, seed=3)
    assert pcm.dtype == np.int16 and len(pcm) == 2 * SR
    assert np.all(pcm != 0)


def _trace(pictures: list[int], gap_frames=frozenset(), late: dict[int, float] | None = None):
    """A listener's record: one video tick per 40 ms showing ``pictures[i]``, and
    speech audio in 20 ms frames, silent in ``gap_frames``."""
    trace = Trace(FPS, SR)
    previous = None
    for i, picture in enumerate(pictures):
        trace.video_times.append(i / FPS + (late or {}).get(i, 0.0))
        trace.video_new.append(picture != previous)
        trace.video_pts.append(i * 3600)
        previous = picture
    n_audio = 2 * len(pictures)
    for k in range(n_audio):
        trace.audio_times.append(k / 50)
        trace.audio_pts.append(k * 480)
        pcm = np.zeros(480, np.int16) if k in gap_frames else np.full(480, 100, np.int16)
        trace.audio.append(pcm)
    return trace


def test_analyse_a_perfectly_paced_run() -> None:
    m = analyse(_trace(list(range(50))))
    assert m.fps == pytest.approx(FPS)
    assert m.interval_p99_dev_ms == pytest.approx(0.0, abs=1e-6)
    assert (m.audio_gaps, m.stalls, m.frames) == (0, 0, 50)


def test_analyse_counts_held_pictures_late_ticks_and_gaps() -> None:
    pictures = list(range(50))
    pictures[10] = pictures[11] = 9  # picture 9 shown for three ticks: one stall
    m = analyse(_trace(pictures, gap_frames={30, 31, 60}, late={40: 0.005}))
    assert m.stalls == 1
    assert m.audio_gaps == 2  # frames 30-31 are one run, 60 another
    assert m.gap_ms == pytest.approx(60.0)
    assert m.interval_max_dev_ms == pytest.approx(5.0)
    assert m.frames == 48
    assert m.fps < FPS


def test_jittery_renderer_is_seeded_and_under_budget() -> None:
    a, b = JitteryRenderer(64, 64, seed=7), JitteryRenderer(64, 64, seed=7)
    draws = [a.draw_ms() for _ in range(2000)]
    assert draws == [b.draw_ms() for _ in range(2000)]
    assert all(10.0 <= d <= 30.0 or d == 120.0 for d in draws)
    assert 120.0 in draws
    assert a.mean_ms < 1000 / FPS
    with pytest.raises(ValueError):
        JitteryRenderer(64, 64, low_ms=30, high_ms=10)


@pytest.mark.parametrize(
    ("capacity", "limit", "held", "failed"),
    [(17, 64, 16, 18), (1, 64, 1, 2), (0, 64, 0, 1), (64, 64, 64, None), (5, 6, 5, 6)],
)
def test_session_search_brackets_the_capacity(capacity, limit, held, failed) -> None:
    tried = []

    def trial(n: int) -> Trial:
        tried.append(n)
        ok = n <= capacity
        return Trial(n, ok, 25.0 if ok else 20.0, 0 if ok else 5, 0, 0, 0, 0)

    assert search(limit, trial, lambda *_: None)[:2] == (held, failed)
    assert max(tried) <= limit and len(tried) == len(set(tried))


def test_session_search_retries_a_single_glitch_once() -> None:
    glitches = {2: 1}  # the first trial of 2 sessions shows one stall, the second none

    def trial(n: int) -> Trial:
        if n >= 3:  # clearly over capacity: no retry
            return Trial(n, False, 20.0, 9, 9, 0, 0, 9)
        stalls = glitches.pop(n, 0)
        return Trial(n, stalls == 0, 25.0, stalls, 0, 0, 0, 0)

    held, failed, trials = search(8, trial, lambda *_: None)
    assert (held, failed) == (2, 3)
    assert [t.sessions for t in trials] == [1, 2, 2, 3, 4]


def test_summary_reports_skipped_sections() -> None:
    text = summary({"sessions": {"skipped": "no GPU here"}, "latency": {"skipped": "x"}})
    assert "== sessions ==\nskipped: no GPU here" in text


# -- the command -------------------------------------------------------------------------


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_fps.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sessions", "0"], "at least 1"),
        (["--batch", "1,x"], "comma-separated"),
        (["--duration", "0"], "--duration must be positive"),
        (["--sections", "model,nope"], "unknown section"),
    ],
)
def test_unusable_arguments_are_explained(args: list[str], message: str) -> None:
    result = _bench(*args, timeout=60)  # refused before anything is measured
    assert result.returncode == 2
    assert message in result.stderr


def test_cuda_without_a_gpu_is_refused_in_words() -> None:
    from scripts.bench.common import resolve_device

    if resolve_device("auto") == "cuda":
        pytest.skip("this machine has a GPU")
    result = _bench("--device", "cuda", timeout=60)
    assert result.returncode == 2
    assert "no CUDA GPU is usable here" in result.stderr


def _check_number(value, *, positive: bool = False) -> None:
    assert isinstance(value, int | float) and not isinstance(value, bool), value
    assert value > 0 if positive else value >= 0, value


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = _bench(
        "--duration", "2", "--batch", "1,2", "--sessions", "1", "--jitter-sweep", "2",
        "--ipc-frames", "40", "--backend", "onnx", "--json", str(out), "--plot", str(plot),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    for name in SECTIONS:
        assert name in data, name
        assert not (isinstance(data[name], dict) and "skipped" in data[name]), (name, data[name])
    for section in SECTIONS[1:]:
        assert f"== {section} ==" in result.stdout

    env = data["env"]
    assert env["cpu_count"] >= 1 and env["python"].startswith("3.")
    assert isinstance(env["onnxruntime_providers"], list)

    assert data["model"], "no model figures"
    for row in data["model"]:
        assert set(row) >= {"weights", "backend", "device", "batch", "fps", "ms_per_frame"}
        assert row["weights"] == "builtin" and row["batch"] in (1, 2)
        _check_number(row["fps"], positive=True)
        _check_number(row["ms_per_frame"], positive=True)

    stages = data["stages"]
    assert set(stages["ms_per_frame"]) == {
        "features",
        "inference",
        "compose",
        "colour",
        "ring_copy",
    }
    for value in stages["ms_per_frame"].values():
        _check_number(value, positive=True)

    ipc = {(r["transport"], r["resolution"]): r for r in data["ipc"]}
    assert set(ipc) == {(t, r) for t in ("ring", "mp_queue") for r in ("512x512", "1280x720")}
    for row in ipc.values():
        _check_number(row["p50_us"], positive=True)
        assert row["p99_us"] >= row["p50_us"]
        _check_number(row["cpu_us_per_frame"], positive=True)

    pacing = {r["design"]: r for r in data["pacing"]}
    assert set(pacing) == {"this", "reference"}
    for row in pacing.values():
        assert row["target_fps"] == 25
        _check_number(row["fps"], positive=True)
        assert row["fps"] <= 25 * 1.1
        _check_number(row["interval_p99_dev_ms"])
        assert isinstance(row["audio_gaps"], int) and row["audio_gaps"] >= 0
        assert isinstance(row["stalls"], int) and row["stalls"] >= 0

    assert [r["jitter_frames"] for r in data["jitter_sweep"]] == [2]

    sessions = data["sessions"]
    assert sessions["target_fps"] == 25 and sessions["weights"] == "builtin"
    assert isinstance(sessions["max_sessions"], int) and 0 <= sessions["max_sessions"] <= 1
    assert isinstance(sessions["device"], str)

    latency = data["latency"]
    _check_number(latency["first_frame_ms"], positive=True)
    _check_number(latency["interrupt_ms"])

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
