"""The mel front end: the published pipeline, window indexing, streaming, the torch version."""

from __future__ import annotations

import subprocess
import sys
from itertools import cycle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.audio_features import (
    LookaheadError,
    MelStream,
    frame_count,
    frame_offset,
    hz_to_mel,
    lookahead_samples,
    mel_filterbank,
    mel_to_hz,
    mel_windows,
    melspectrogram,
    resample_to_16k,
    window_start,
)
from renderers.base import RenderStream
from renderers.framing import AudioFramer


class LipSyncStream(RenderStream):
    """The renderer-side wrapper, as a lip-sync backend is expected to write it."""

    def __init__(self, sample_rate: int, fps: float, lookahead: int | None = None) -> None:
        self.mel = MelStream(sample_rate)
        super().__init__(sample_rate, fps, self.mel.lookahead if lookahead is None else lookahead)

    def _on_pcm(self, pcm):
        self.mel.push(pcm)

    def _features(self, span):
        return self.mel.window(span.pts)

    def _on_segment_end(self):
        self.mel.end_segment()

    def _on_reset(self):
        self.mel.reset()


def speechlike(n: int, sample_rate: int, seed: int = 0, level: float = 6000.0) -> np.ndarray:
    """Harmonics + noise under a syllable-rate envelope with pauses, int16."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sample_rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6)), 0, None) ** 2
    x = level * envelope * (0.3 * voiced + 0.2 * rng.standard_normal(n))
    return np.clip(x, -32768, 32767).astype(np.int16)


def run_stream(stream: LipSyncStream, pcm: np.ndarray, chunks: list[int]) -> list:
    jobs, pos = [], 0
    for size in cycle(chunks):
        if pos >= len(pcm):
            break
        jobs += stream.push(pcm[pos : pos + size])
        pos += size
    return jobs + stream.end_segment()


# ---------------------------------------------------------------- the published pipeline


def test_mel_scale_is_slaney():
    assert hz_to_mel(1000.0) == pytest.approx(15.0)
    assert hz_to_mel(200.0 / 3) == pytest.approx(1.0)
    assert mel_to_hz(hz_to_mel(np.array([55.0, 440.0, 7600.0]))) == pytest.approx([55, 440, 7600])


def test_filterbank_matches_librosa_defaults():
    # Facts of librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600).
    fb = mel_filterbank()
    assert fb.shape == (80, 401)
    assert list(np.nonzero(fb[0])[0]) == [3, 4, 5, 6]
    np.testing.assert_allclose(fb[0, 3:7], [0.003869592, 0.01934796, 0.02081245, 0.005334082], 1e-6)
    assert list(fb.argmax(axis=1)[[0, 20, 40, 60, 79]]) == [5, 40, 86, 181, 366]
    assert fb.sum() == pytest.approx(3.999498, abs=1e-5)


def test_melspectrogram_matches_librosa_pipeline():
    # Reference values: librosa 0.11 stft(center=True, pad_mode="constant") of the
    # pre-emphasised signal, filters.mel, then Wav2Lip's dB scaling.
    t = np.arange(16000) / 16000
    wav = (
        0.3 * np.sin(2 * np.pi * (100 * t + 2000 * t**2))
        + 0.05 * np.sin(2 * np.pi * 6000 * t)
        + 0.02 * np.sin(2 * np.pi * 7000 * t**1.5)
    )
    mel = melspectrogram(wav)
    assert mel.shape == (80, 81) and mel.dtype == np.float32
    first = [0.22616, -1.15917, -1.33782, -0.85782, -1.05951, -2.85073, -3.96211, -2.96853]
    np.testing.assert_allclose(mel[:64:8, 0], first, atol=1e-4)
    last = [-0.49642, -0.46396, -0.48018, -0.46213, -0.41167, -0.36743, -0.2402, 0.0621, 1.80047]
    np.testing.assert_allclose(mel[:72:8, 80], last, atol=1e-4)
    np.testing.assert_allclose(mel[40:56:8, 40], [-3.87812, -1.69414], atol=1e-4)


def test_silence_is_minus_four_and_louder_is_higher():
    assert np.all(melspectrogram(np.zeros(8000)) == -4.0)
    t = np.arange(16000) / 16000
    square = np.sign(np.sin(2 * np.pi * 300 * t))
    quiet, loud = melspectrogram(0.005 * square), melspectrogram(0.5 * square)
    assert quiet.min() >= -4.0 and loud.max() <= 4.0
    # 40 dB louder is 3.2 higher on the [-4, 4] scale wherever neither is clipped
    free = (quiet > -4.0) & (loud < 4.0)
    np.testing.assert_allclose((loud - quiet)[free], 8 * 40 / 100, atol=1e-3)


def test_resampler_keeps_time_alignment_and_length():
    pcm = np.zeros(24000, np.int16)
    pcm[12000] = 30000
    wav = resample_to_16k(pcm, 24000)
    assert len(wav) == 16000
    assert int(np.argmax(wav)) == 8000  # 0.5 s at 24 kHz is 0.5 s at 16 kHz
    assert np.array_equal(resample_to_16k(pcm[:1600], 16000), pcm[:1600] / 32768.0)


# ---------------------------------------------------------------- frames and windows


@pytest.mark.parametrize("fps", [25, 30])
@pytest.mark.parametrize("sample_rate", [16000, 24000, 48000])
def test_window_start_is_int_80_i_over_fps(fps, sample_rate):
    for i in range(2000):
        assert window_start(frame_offset(i, sample_rate, fps), sample_rate) == int(80 * i / fps)


def test_window_start_examples():
    starts25 = [window_start(frame_offset(i, 24000, 25), 24000) for i in range(6)]
    starts30 = [window_start(frame_offset(i, 24000, 30), 24000) for i in range(6)]
    assert starts25 == [0, 3, 6, 9, 12, 16]  # 3.2 mel frames per video frame
    assert starts30 == [0, 2, 5, 8, 10, 13]  # 2.67 mel frames per video frame


@pytest.mark.parametrize("fps", [25, 30, 29.97, 24])
def test_frame_arithmetic_agrees_with_the_audio_framer(fps):
    n = 24000 * 2 + 777
    framer = AudioFramer(24000, fps)
    spans = framer.push(np.zeros(n, np.int16)) + framer.end_segment()
    assert len(spans) == frame_count(n, 24000, fps)
    assert [s.pts for s in spans] == [frame_offset(i, 24000, fps) for i in range(len(spans))]


def test_mel_windows_slice_the_spectrogram():
    pcm = speechlike(24000, 24000)
    windows = mel_windows(pcm, 24000, 25)
    assert windows.shape == (25, 1, 80, 16) and windows.dtype == np.float32
    mel = melspectrogram(resample_to_16k(pcm, 24000), n_frames=80 + 16)
    for i in (0, 1, 7, 24):
        s = int(80 * i / 25)
        assert np.array_equal(windows[i, 0], mel[:, s : s + 16])
    assert mel_windows(np.zeros(0, np.int16), 24000, 25).shape == (0, 1, 80, 16)


def test_last_frames_see_silence_after_the_segment():
    pcm = speechlike(24000 // 2, 24000, level=20000)
    windows = mel_windows(pcm, 24000, 25)
    assert windows.shape[0] == 13  # 0.5 s at 25 fps
    assert np.all(windows[-1, 0, :, -4:] == -4.0)  # 560-600 ms: well past the end


# ---------------------------------------------------------------- streaming


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample_rate=st.sampled_from([24000, 16000, 48000]),
    fps=st.sampled_from([25, 30, 29.97, 24, 12.5, 60]),
    seconds=st.floats(0.0, 1.5),
    chunks=st.lists(st.integers(1, 9000), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_streaming_equals_whole_file(sample_rate, fps, seconds, chunks, seed):
    pcm = speechlike(int(seconds * sample_rate), sample_rate, seed)
    jobs = run_stream(LipSyncStream(sample_rate, fps), pcm, chunks)
    expected = mel_windows(pcm, sample_rate, fps)
    assert len(jobs) == len(expected)
    for job, window in zip(jobs, expected, strict=True):
        assert np.array_equal(job.features, window)


def test_segments_are_independent_files():
    a, b = speechlike(30000, 24000, 1), speechlike(17000, 24000, 2)
    stream = LipSyncStream(24000, 25)
    jobs = run_stream(stream, a, [4800]) + run_stream(stream, b, [333, 7500])
    expected = np.concatenate([mel_windows(a, 24000, 25), mel_windows(b, 24000, 25)])
    assert np.array_equal(np.stack([j.features for j in jobs]), expected)
    assert [j.span.segment_end for j in jobs].count(True) == 2


def test_reset_forgets_the_interrupted_segment():
    stream = LipSyncStream(24000, 25)
    stream.push(speechlike(20000, 24000, 3))
    stream.reset()
    b = speechlike(15000, 24000, 4)
    jobs = run_stream(stream, b, [1000])
    assert np.array_equal(np.stack([j.features for j in jobs]), mel_windows(b, 24000, 25))


def test_too_little_lookahead_is_explained():
    stream = LipSyncStream(24000, 25, lookahead=0)
    with pytest.raises(LookaheadError, match="lookahead=5"):
        stream.push(speechlike(2000, 24000))


def test_lookahead_is_about_212_ms():
    assert 5100 <= lookahead_samples(24000) <= 5200
    assert lookahead_samples(16000) == 3401
    # It is enough: the framer releases frame i exactly when the window can be built.
    stream = LipSyncStream(24000, 25)
    jobs = stream.push(speechlike(24000, 24000))
    assert len(jobs) == (24000 - lookahead_samples(24000)) // 960 + 1


def test_windows_must_come_in_order():
    mel = MelStream(24000)
    mel.push(speechlike(24000, 24000))
    mel.window(9600)
    with pytest.raises(ValueError, match="frame order"):
        mel.window(0)


def test_importing_features_does_not_import_torch():
    code = "import sys, models, models.audio_features, models.contract, models.weights; "
    code += "sys.exit('torch' in sys.modules or 'onnxruntime' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


# ---------------------------------------------------------------- torch implementation


@pytest.mark.parametrize("fps", [25, 30])
def test_torch_mel_matches_numpy(fps):
    torch_features = pytest.importorskip("models.audio_features_torch")
    pcm = speechlike(24000 * 2, 24000, 5, level=12000)
    expected = mel_windows(pcm, 24000, fps)
    got = torch_features.mel_windows_torch(pcm, 24000, fps).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3


def test_torch_mel_batches_signals():
    import torch

    from models.audio_features_torch import MelSpectrogram

    wav = np.stack([resample_to_16k(speechlike(12000, 24000, s), 24000) for s in (6, 7)])
    batched = MelSpectrogram()(torch.from_numpy(wav), n_frames=60).numpy()
    for row, signal in zip(batched, wav, strict=True):
        assert np.abs(row - melspectrogram(signal, n_frames=60)).max() < 1e-3
