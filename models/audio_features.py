"""Wav2Lip's mel front end, in numpy, for whole files and for live streams.

The pipeline (constants below) is the one Wav2Lip-compatible weights were trained on:

    int16 PCM at the session rate
      -> resample to 16 kHz (libswresample through PyAV), scale to [-1, 1)
      -> pre-emphasis y[n] = x[n] - 0.97 x[n-1]
      -> |STFT|: periodic Hann window of 800, hop 200, frames centred on k * 200
      -> 80 Slaney mel bands, 55-7600 Hz
      -> 20 log10(max(1e-5, m)) - 20 dB, mapped linearly from [-100, 0] dB to [-4, 4], clipped

Edges.  A segment is treated as a file of its own: the pre-emphasised signal is
zero before its first sample (the centre padding of the first STFT frames) and
after its last one (so the last video frames of a segment get full windows).
This is librosa's ``stft(center=True, pad_mode="constant")``; the filterbank is
librosa's default ``filters.mel`` (Slaney scale and area normalisation).  (The
original Wav2Lip code ran an older librosa whose default padding was "reflect";
that differs only in the first and last two mel frames of a segment.)

Windows.  Video frame ``i`` starts at sample ``floor(i * rate / fps)`` of its
segment; its window is the 16 mel frames (200 ms) starting at mel frame
``floor(80 * offset / rate)``, which is ``int(80 * i / fps)`` whenever the rate
is a multiple of 80 Hz (16, 24, 48 kHz ...).

Streaming.  :class:`MelStream` computes the same numbers as :func:`mel_windows`,
bit for bit, whatever the chunking: the resampler gives identical output for any
chunking, pre-emphasis carries its one sample of state, every mel frame is
computed from the same 800 samples by row-independent arithmetic (no BLAS
matmul, whose rounding depends on how many rows it is given).
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import av
import numpy as np

from .timing import FrameTiming, exact_fps

SAMPLE_RATE = 16_000
N_FFT = 800
HOP = 200
WIN = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS_VALUE = 4.0
AMP_FLOOR = 1e-5  # 10 ** (MIN_LEVEL_DB / 20)
MEL_FPS = SAMPLE_RATE // HOP  # 80 mel frames per second
WINDOW_FRAMES = 16  # mel frames per model input window (200 ms)
CENTER_PAD = N_FFT // 2  # zeros before the first sample (centred frames)

# Samples of 16 kHz audio past a window's first mel frame's centre that the window
# reads: the last frame is centred 15 hops later and reaches half an FFT further.
WINDOW_REACH_16K = (WINDOW_FRAMES - 1) * HOP + N_FFT // 2
# Output samples libswresample holds back while streaming (measured: 16 at 24 and
# 48 kHz input, 0 at 16 kHz); the allowance leaves room for other library builds.
RESAMPLER_DELAY_16K = 32


class LookaheadError(RuntimeError):
    """A window was asked for before enough future audio had arrived."""


# ---------------------------------------------------------------- mel filterbank


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    mel = hz / f_sp
    log_part = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, log_part, mel)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    hz = mel * f_sp
    log_part = min_log_hz * np.exp(logstep * (mel - min_log_mel))
    return np.where(mel >= min_log_mel, log_part, hz)


@lru_cache(maxsize=4)
def mel_filterbank(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    fmin: float = FMIN,
    fmax: float = FMAX,
) -> np.ndarray:
    """Triangular filters, equally spaced in mel, area-normalised ("slaney"): [n_mels, n_fft//2+1].

    The returned array is read-only (it is cached and shared).
    """
    bins_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges_hz)
    distance = edges_hz[:, None] - bins_hz[None, :]  # [n_mels + 2, bins]
    rising = -distance[:-2] / widths[:-1, None]
    falling = distance[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=1)
def _mel_basis_t() -> np.ndarray:
    basis = np.ascontiguousarray(mel_filterbank().T)  # [bins, mels]
    basis.setflags(write=False)
    return basis


@lru_cache(maxsize=1)
def hann_window() -> np.ndarray:
    """Periodic Hann window of length ``WIN`` (the STFT convention)."""
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(WIN) / WIN)
    w.setflags(write=False)
    return w


# ---------------------------------------------------------------- signal steps


class Resampler:
    """Streaming int16 -> 16 kHz float64 in [-1, 1); output is independent of chunking.

    Wraps ``av.AudioResampler`` (libswresample).  It holds back a few output
    samples (see ``RESAMPLER_DELAY_16K``) until :meth:`flush`; after a flush the
    object is spent.
    """

    def __init__(self, sample_rate: int) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample rate must be positive, got {sample_rate}")
        self.sample_rate = sample_rate
        self._swr = (
            None
            if sample_rate == SAMPLE_RATE
            else av.AudioResampler(format="dbl", layout="mono", rate=SAMPLE_RATE)
        )

    def push(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.ascontiguousarray(pcm, dtype=np.int16).ravel()
        if self._swr is None:
            return pcm / 32768.0
        if not pcm.size:
            return np.zeros(0)
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        return self._collect(self._swr.resample(frame))

    def flush(self) -> np.ndarray:
        if self._swr is None:
            return np.zeros(0)
        return self._collect(self._swr.resample(None))

    @staticmethod
    def _collect(frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.zeros(0)
        return np.concatenate([f.to_ndarray().ravel() for f in frames]).astype(np.float64)


def resample_to_16k(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """Whole-signal resampling: int16 at ``sample_rate`` -> float64 at 16 kHz."""
    r = Resampler(sample_rate)
    return np.concatenate([r.push(pcm), r.flush()])


def preemphasis(x: np.ndarray, previous: float = 0.0) -> np.ndarray:
    """``y[n] = x[n] - 0.97 x[n-1]``, with ``x[-1] = previous``."""
    y = np.empty_like(x, dtype=np.float64)
    if x.size:
        y[0] = x[0] - PREEMPHASIS * previous
        np.subtract(x[1:], PREEMPHASIS * x[:-1], out=y[1:])
    return y


def mel_frames(emphasised: np.ndarray) -> np.ndarray:
    """Normalised mel frames from pre-emphasised, padded 16 kHz samples: [frames, 80] float32.

    Frame ``k`` reads ``emphasised[k * HOP : k * HOP + N_FFT]``; trailing samples
    that do not fill a frame are ignored.
    """
    n = 0 if len(emphasised) < N_FFT else (len(emphasised) - N_FFT) // HOP + 1
    if n == 0:
        return np.zeros((0, N_MELS), dtype=np.float32)
    emphasised = np.ascontiguousarray(emphasised, dtype=np.float64)
    step = emphasised.strides[0]
    frames = np.lib.stride_tricks.as_strided(
        emphasised, shape=(n, N_FFT), strides=(HOP * step, step), writeable=False
    )
    magnitude = np.abs(np.fft.rfft(frames * hann_window(), axis=-1))
    # einsum's loop sums each output in a fixed order whatever the row count, unlike
    # BLAS, so a frame gets the same bits alone or in a batch.
    mel = np.einsum("fk,km->fm", magnitude, _mel_basis_t())
    return normalize_db(20.0 * np.log10(np.maximum(AMP_FLOOR, mel)) - REF_LEVEL_DB)


def normalize_db(db: np.ndarray) -> np.ndarray:
    """Map [-100, 0] dB linearly onto [-4, 4] and clip (Wav2Lip's symmetric scaling)."""
    scaled = 2 * MAX_ABS_VALUE * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS_VALUE
    return np.clip(scaled, -MAX_ABS_VALUE, MAX_ABS_VALUE).astype(np.float32)


def melspectrogram(wav16k: np.ndarray, n_frames: int | None = None) -> np.ndarray:
    """Normalised mel spectrogram of 16 kHz float audio: [80, n_frames] float32.

    Frame ``k`` is centred on sample ``k * 200``; the pre-emphasised signal is
    zero outside ``wav16k`` (librosa's ``stft(center=True, pad_mode="constant")``).
    ``n_frames`` defaults to ``1 + len(wav16k) // 200`` and may be larger (the
    frames past the end see zeros).
    """
    if n_frames is None:
        n_frames = 1 + len(wav16k) // HOP
    need = (n_frames - 1) * HOP + N_FFT if n_frames > 0 else 0
    padded = np.zeros(max(need, CENTER_PAD + len(wav16k)))
    padded[CENTER_PAD : CENTER_PAD + len(wav16k)] = preemphasis(wav16k)
    return mel_frames(padded[:need])[:n_frames].T.copy()


# ---------------------------------------------------------------- frames and windows


def fps_fraction(fps: float) -> Fraction:
    """The exact frame rate the audio framer uses (29.97 -> 30000/1001)."""
    return exact_fps(fps)


def frame_offset(index: int, sample_rate: int, fps: float) -> int:
    """First sample of video frame ``index`` within its segment."""
    return FrameTiming(fps, sample_rate).start(index)


def frame_count(n_samples: int, sample_rate: int, fps: float) -> int:
    """Video frames a segment of ``n_samples`` is cut into (the last may be short)."""
    return FrameTiming(fps, sample_rate).frames_in(n_samples)


def window_start(offset: int, sample_rate: int) -> int:
    """First mel frame of the window of a video frame starting at sample ``offset``."""
    return offset * MEL_FPS // sample_rate


def lookahead_samples(sample_rate: int) -> int:
    """Samples past a frame's first sample that must have arrived before its window exists.

    This is the ``lookahead`` to give the audio framer: 212.5 ms of window reach
    plus an allowance for the resampler's hold-back; 5,150 samples at 24 kHz.
    """
    delay = 0 if sample_rate == SAMPLE_RATE else RESAMPLER_DELAY_16K
    return math.ceil((WINDOW_REACH_16K + delay + 1) * sample_rate / SAMPLE_RATE)


def mel_windows(pcm: np.ndarray, sample_rate: int, fps: float) -> np.ndarray:
    """Model input windows for every video frame of one segment: [frames, 1, 80, 16] float32."""
    wav = resample_to_16k(pcm, sample_rate)
    n_video = frame_count(len(pcm), sample_rate, fps)
    starts = [window_start(frame_offset(i, sample_rate, fps), sample_rate) for i in range(n_video)]
    if not starts:
        return np.zeros((0, 1, N_MELS, WINDOW_FRAMES), dtype=np.float32)
    mel = melspectrogram(wav, n_frames=starts[-1] + WINDOW_FRAMES)
    return np.stack([mel[None, :, s : s + WINDOW_FRAMES] for s in starts])


class MelStream:
    """Per-session streaming mel windows, identical to :func:`mel_windows` per segment.

    Drive it with the renderer stream's hooks::

        class LipSyncStream(RenderStream):
            def __init__(self, sample_rate, fps):
                self.mel = MelStream(sample_rate)
                super().__init__(sample_rate, fps, lookahead=self.mel.lookahead)
            def _on_pcm(self, pcm):       self.mel.push(pcm)
            def _features(self, span):    return self.mel.window(span.pts)
            def _on_segment_end(self):    self.mel.end_segment()
            def _on_reset(self):          self.mel.reset()

    Sample axes within one segment::

        stream position      pts                       (what FrameSpan.pts counts)
        segment offset       rel = pts - segment_start
        16 kHz               u   (resampled)
        padded 16 kHz        p = u + 400               (400 zeros before the segment)
        mel frame k          reads p in [200 k, 200 k + 800)

    Pushes only queue samples; a window request resamples everything queued and
    computes all the mel frames it completes, in one batch.  Afterwards only
    the samples the next mel frame needs and the frames from the last requested
    window on are kept.  Windows must be requested in order; a push after
    :meth:`end_segment` starts a new segment at the current stream position (as
    the framer does).
    """

    def __init__(self, sample_rate: int = 24_000) -> None:
        self.sample_rate = sample_rate
        self.lookahead = lookahead_samples(sample_rate)
        self.reset()

    def reset(self) -> None:
        """Forget everything (interrupt); stream positions restart at 0."""
        self._position = 0
        self._start_segment(0)

    def push(self, pcm: np.ndarray) -> None:
        """Add int16 samples at the session rate (cheap: the work is done by :meth:`window`)."""
        if not pcm.size:
            return
        if self._ended:
            self._start_segment(self._position)
        self._position += pcm.size
        self._pending.append(np.array(pcm, dtype=np.int16).ravel())

    def end_segment(self) -> None:
        """The segment's audio is complete: everything after it is silence."""
        if not self._ended:
            self._drain()
            self._append(self._resampler.flush())
            self._ended = True

    def window(self, pts: int) -> np.ndarray:
        """The [1, 80, 16] float32 window of the video frame starting at stream sample ``pts``."""
        rel = pts - self._segment_start
        if rel < 0:
            raise ValueError(
                f"frame at sample {pts} precedes the segment starting at {self._segment_start}"
            )
        start = window_start(rel, self.sample_rate)
        if start < self._mel_offset:
            raise ValueError(
                f"window at mel frame {start} was asked for after one at {self._mel_offset}; "
                "windows must be requested in frame order"
            )
        need = start + WINDOW_FRAMES
        self._drain()
        if self._ended:
            self._extend_with_silence(need)
        have = self._mel_offset + len(self._mel)
        if have < need:
            raise LookaheadError(
                f"the window of the frame at sample {pts} needs mel frames up to {need}, "
                f"only {have} exist: give the audio framer lookahead={self.lookahead}"
            )
        self._mel = self._mel[start - self._mel_offset :]
        self._mel_offset = start
        return np.ascontiguousarray(self._mel[:WINDOW_FRAMES].T)[None]

    # ------------------------------------------------------------ internals

    def _start_segment(self, start: int) -> None:
        self._segment_start = start
        self._resampler = Resampler(self.sample_rate)
        self._pending: list[np.ndarray] = []  # pushed PCM not yet resampled
        self._ended = False
        self._last_input = 0.0  # pre-emphasis state: the previous 16 kHz sample
        self._signal = np.zeros(CENTER_PAD)  # pre-emphasised, padded axis
        self._signal_offset = 0  # padded index of _signal[0]
        self._mel = np.zeros((0, N_MELS), dtype=np.float32)
        self._mel_offset = 0  # mel frame index of _mel[0]

    def _drain(self) -> None:
        if self._pending:
            pcm = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
            self._pending = []
            self._append(self._resampler.push(pcm))

    def _append(self, wav16k: np.ndarray) -> None:
        if wav16k.size:
            emphasised = preemphasis(wav16k, self._last_input)
            self._last_input = float(wav16k[-1])
            self._append_emphasised(emphasised)

    def _append_emphasised(self, emphasised: np.ndarray) -> None:
        self._signal = np.concatenate([self._signal, emphasised])
        next_frame = self._mel_offset + len(self._mel)
        begin = next_frame * HOP - self._signal_offset
        new = mel_frames(self._signal[begin:])
        if len(new):
            self._mel = np.concatenate([self._mel, new])
            consumed = begin + len(new) * HOP
            self._signal = self._signal[consumed:]
            self._signal_offset += consumed

    def _extend_with_silence(self, n_frames: int) -> None:
        have = self._mel_offset + len(self._mel)
        if have < n_frames:
            end = (n_frames - 1) * HOP + N_FFT  # padded index the last frame reaches
            filled = self._signal_offset + len(self._signal)
            self._append_emphasised(np.zeros(end - filled))
