"""Frame timing: one rule for where video frames sit on the audio sample axis.

29.97 fps is 30000/1001 by construction: over ten minutes no frame start
drifts, every sample belongs to exactly one frame and the 90 kHz pts step by
exactly 3003.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from conftest import ManualTime

from models.timing import FrameTiming as SharedFrameTiming
from worker.clock import VIDEO_CLOCK_RATE, FrameTiming, MediaClock, exact_fps
from worker.synchronizer import AvatarSynchronizer
from worker.tracks import AvatarVisualTrack, AvatarVoiceTrack

SR = 24_000
TEN_MINUTES = 10 * 60 * SR


@pytest.mark.parametrize(
    ("given", "exact"),
    [
        (29.97, Fraction(30000, 1001)),
        (23.976, Fraction(24000, 1001)),
        (59.94, Fraction(60000, 1001)),
        (Fraction(30000, 1001), Fraction(30000, 1001)),
        (25, Fraction(25)),
        (25.0, Fraction(25)),
        (24.0, Fraction(24)),
        (30, Fraction(30)),
        (1, Fraction(1)),
        (1.0, Fraction(1)),
        (60.0, Fraction(60)),
        (14.985, Fraction(15000, 1001)),
        (12.5, Fraction(25, 2)),
        (Fraction(2997, 100), Fraction(2997, 100)),  # a Fraction is taken as it is
    ],
)
def test_fps_is_the_exact_rate_it_names(given, exact) -> None:
    assert exact_fps(given) == exact
    assert FrameTiming(given, SR).fps == exact


def test_the_renderer_side_and_the_session_side_share_one_helper() -> None:
    assert FrameTiming is SharedFrameTiming


@pytest.mark.parametrize("bad", [0, -25.0])
def test_nonpositive_fps_is_refused(bad) -> None:
    with pytest.raises(ValueError):
        FrameTiming(bad, SR)
    with pytest.raises(ValueError):
        FrameTiming(25, 0)


def test_2997_over_ten_minutes_never_drifts_and_covers_every_sample_once() -> None:
    t = FrameTiming(29.97, SR)
    n = t.frames_in(TEN_MINUTES)
    assert n == 17983  # ceil(600 s * 30000/1001)
    starts = [t.start(i) for i in range(n + 1)]
    # frame i starts at floor(i * sample_rate * 1001 / 30000), exactly, to the last frame
    assert starts == [i * SR * 1001 // 30000 for i in range(n + 1)]
    assert starts[-2] < TEN_MINUTES <= starts[-1]
    ideal = np.arange(n + 1) * (SR * 1001 / 30000)
    assert np.all(np.abs(np.array(starts) - ideal) < 1)  # no drift, ever
    # contiguous: each frame ends where the next starts; all of them together are the stream
    sizes = [t.samples(i) for i in range(n)]
    assert set(sizes) == {800, 801}
    assert sum(sizes) == starts[-1] and t.end(n - 1) == starts[-1]
    assert t.max_samples == 801
    # every sample belongs to exactly one frame: frame_at inverts start() at every edge
    for i in range(n):
        assert t.frame_at(starts[i]) == i
        assert t.frame_at(starts[i + 1] - 1) == i
    positions = np.arange(0, TEN_MINUTES, 997)
    owners = np.searchsorted(np.array(starts), positions, side="right") - 1
    assert [t.frame_at(int(p)) for p in positions] == owners.tolist()


def test_2997_pts_are_monotonic_with_an_exact_3003_step() -> None:
    t = FrameTiming(29.97, SR)
    pts = [t.pts(i) for i in range(t.frames_in(TEN_MINUTES))]
    assert np.all(np.diff(pts) == 3003)
    assert pts[0] == 0 and VIDEO_CLOCK_RATE == 90_000
    assert [t.frame_of_pts(p) for p in pts[:1000]] == list(range(1000))
    assert t.pts(30, rate=SR) == t.start(30)


@pytest.mark.parametrize("fps", [25, 30, 29.97, 12.5, 7, 60])
def test_frame_at_and_frames_in_agree_with_start(fps) -> None:
    t = FrameTiming(fps, 16_000)
    for n in range(0, 5000, 37):
        k = t.frames_in(n)
        assert (k == 0) if n == 0 else (t.start(k - 1) < n <= t.start(k))
    for i in range(200):
        assert t.frame_of_pts(t.pts(i)) == i
        assert t.position(i) == Fraction(i * 16_000) / t.fps
        assert t.start(i) == int(t.position(i))


async def test_the_visual_track_at_2997_ticks_on_exact_frame_starts_for_ten_minutes() -> None:
    time = ManualTime()
    clock = MediaClock(SR, time_fn=time)
    track = AvatarVisualTrack(16, 16, 29.97, clock=clock)
    asked: list[int] = []

    class Source:
        def video_at(self, position: int):
            asked.append(position)
            return None

    track.attach(Source(), clock)
    n = FrameTiming(29.97, SR).frames_in(TEN_MINUTES)
    time.at(clock, TEN_MINUTES)  # every tick is due: recv never sleeps
    pts = [(await track.recv()).pts for _ in range(n)]
    assert pts == [i * 3003 for i in range(n)]
    assert asked == [i * SR * 1001 // 30000 for i in range(n)]


async def test_the_synchronizer_uses_the_same_frames_for_its_idle_loop() -> None:
    clock = MediaClock(SR, time_fn=ManualTime())
    audio = AvatarVoiceTrack(SR, 1, clock=clock)
    video = AvatarVisualTrack(16, 16, 29.97, clock=clock)
    sync = AvatarSynchronizer(audio, video, 29.97, clock=clock)
    assert sync.fps == video.fps == Fraction(30000, 1001)
    loop = [object() for _ in range(7)]
    sync.set_idle_frames(loop)  # type: ignore[arg-type]
    t = sync.timing
    for i in range(0, 17983, 101):
        assert sync.idle_frame(t.start(i)) is loop[i % 7]
        assert sync.idle_frame(t.end(i) - 1) is loop[i % 7]


@pytest.mark.parametrize("fps", [29.97, Fraction(30000, 1001), 25])
def test_the_rings_and_the_session_agree_on_the_exact_rate(fps) -> None:
    """The frame ring carries the same exact rate the tracks and the framer use."""
    from renderers.control import SessionRings
    from worker.shm_renderer import ShmRenderer
    from worker.types import AvatarSettings

    rings = SessionRings.create(width=64, height=64, fps=fps, sample_rate=SR, audio_seconds=1)
    try:
        g = rings.frames.geometry
        assert g.fps == exact_fps(fps) == FrameTiming(float(fps), SR).fps
        assert g.max_audio == FrameTiming(fps, SR).max_samples
        settings = AvatarSettings(
            video_width=64, video_height=64, video_fps=float(fps), audio_sample_rate=SR
        )
        renderer = ShmRenderer(rings, settings=settings)  # raises if the rates differ
        assert renderer.sample_rate == SR
    finally:
        rings.close()
