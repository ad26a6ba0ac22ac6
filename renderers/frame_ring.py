"""The frame ring: renderer -> session, one video frame plus its audio per slot.

A single-producer/single-consumer ring of fixed-size slots in one memfd
segment.  The renderer fills slots, the session reads them.  A full ring makes
the renderer wait for that session (backpressure); a slot is never
overwritten before the session released it.  The reader gets zero-copy numpy
views into the slot and copies what it keeps before releasing it.

Memory layout (little-endian)::

    byte 0    | magic u32 | version u32 | slots u32 | width u32 | height u32 |
              | max_audio u32 | sample_rate u32 | fps_num u32 | fps_den u32 |
              | slot_bytes u64 |                                   fixed at creation
    byte 64   | head u64 |      slots published, written by the renderer (producer)
    byte 128  | tail u64 |      slots released, written by the session (consumer)
    byte 192  | slot 0 | slot 1 | ... | slot (slots - 1) |

    slot (``slot_bytes``, a multiple of 64):
    | seq u64 | epoch u64 | pts u64 | flags u32 | n_audio u32 | (pad to 64) |
    | I420 frame: width * height * 3 / 2 bytes (Y, then U, then V)         |
    | audio: max_audio int16 samples, the first n_audio valid | (pad)      |

``head`` and ``tail`` count slots since creation and only grow; slot ``n``
lives at index ``n % slots``.  ``seq`` is ``n``; ``pts`` is the stream
sample position of the slot's first audio sample; ``epoch`` the interrupt
epoch of the audio it was rendered from.

Flags: ``SPEECH`` (a rendered frame, its audio plays while it is shown),
``IDLE`` (no frame, no audio, never stale: the renderer's idle loop was
published in the shared :class:`~renderers.idle_loop.IdleLoop` segment;
``pts`` is its generation), ``SEGMENT_END`` (the last slot of a segment; on
its own, without a frame, it ends a segment that had no audio).

Slot state machine (slot index ``i``)::

             renderer: write header, frame, audio; then head += 1; ring `ready`
      FREE  ───────────────────────────────────────────────────────────────▶  READY
        ▲                                                                       │
        └────────────  session: copy out, then tail += 1; ring `free`  ◀───────┘

    The renderer may fill slot ``head`` only while ``head - tail < slots``;
    the session may read slot ``tail`` only while ``tail < head``.  Each
    index has one writer, and it is published only after the slot's bytes
    are in place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from models.timing import FrameTiming, exact_fps

from .shm import Doorbell, Segment

MAGIC = 0x46524D52  # "FRMR"
VERSION = 2  # 2: IDLE slots announce the shared idle loop instead of carrying its frames
HEADER_BYTES = 192
SLOT_HEADER = 64
SPEECH, IDLE, SEGMENT_END = 1, 2, 4

_GEOMETRY = struct.Struct("<IIIIIIIIIQ")
_SLOT = struct.Struct("<QQQII")
_HEAD, _TAIL = 8, 16  # u64 word indices


def _align64(n: int) -> int:
    return (n + 63) & ~63


@dataclass(frozen=True, slots=True)
class FrameRingGeometry:
    slots: int
    width: int
    height: int
    max_audio: int  # samples per slot
    sample_rate: int
    fps: Fraction

    @property
    def frame_bytes(self) -> int:
        return self.width * self.height * 3 // 2

    @property
    def slot_bytes(self) -> int:
        return _align64(SLOT_HEADER + _align64(self.frame_bytes) + 2 * self.max_audio)


def samples_per_frame_max(sample_rate: int, fps: float | Fraction) -> int:
    """The most audio samples one frame can carry at this rate."""
    return FrameTiming(fps, sample_rate).max_samples


@dataclass(slots=True)
class FrameSlot:
    """A slot as the session sees it; ``video``/``audio`` are views into shared memory."""

    seq: int
    epoch: int
    pts: int
    flags: int
    video: np.ndarray  # uint8 (height * 3 // 2, width), valid until release()
    audio: np.ndarray  # int16 (n_audio,), valid until release()


class FrameRing:
    """One frame ring; the renderer uses the writer methods, the session the reader ones."""

    def __init__(self, segment: Segment, ready: Doorbell, free: Doorbell) -> None:
        self.segment, self.ready_bell, self.free_bell = segment, ready, free
        fields = _GEOMETRY.unpack_from(segment.buf, 0)
        magic, version, slots, width, height, max_audio, rate, num, den, slot_bytes = fields
        if magic != MAGIC or version != VERSION:
            raise ValueError("this memory is not a frame ring of this version")
        self.geometry = g = FrameRingGeometry(
            slots, width, height, max_audio, rate, Fraction(num, den)
        )
        if slot_bytes != g.slot_bytes or HEADER_BYTES + slots * slot_bytes > segment.size:
            raise ValueError("frame ring geometry does not match its segment")
        self._words = segment.buf[:HEADER_BYTES].cast("Q")
        self._headers: list[memoryview] = []
        self._video: list[np.ndarray] = []
        self._audio: list[np.ndarray] = []
        for i in range(slots):
            base = HEADER_BYTES + i * slot_bytes
            self._headers.append(segment.buf[base : base + SLOT_HEADER])
            video = base + SLOT_HEADER
            audio = video + _align64(g.frame_bytes)
            frame = np.frombuffer(segment.buf, np.uint8, g.frame_bytes, video)
            self._video.append(frame.reshape(height * 3 // 2, width))
            self._audio.append(np.frombuffer(segment.buf, np.int16, max_audio, audio))

    @classmethod
    def create(
        cls,
        *,
        width: int,
        height: int,
        fps: float | Fraction,
        sample_rate: int,
        slots: int = 16,
        max_audio: int | None = None,
    ) -> FrameRing:
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise ValueError(f"I420 frames need positive even dimensions, got {width}x{height}")
        if slots < 1:
            raise ValueError(f"a frame ring needs at least one slot, got {slots}")
        fps = exact_fps(fps)
        max_audio = max_audio or samples_per_frame_max(sample_rate, fps)
        g = FrameRingGeometry(slots, width, height, max_audio, sample_rate, fps)
        segment = Segment.create("avatar-frame-ring", HEADER_BYTES + slots * g.slot_bytes)
        _GEOMETRY.pack_into(
            segment.buf,
            0,
            *(MAGIC, VERSION, slots, width, height, max_audio, sample_rate),
            *(fps.numerator, fps.denominator, g.slot_bytes),
        )
        return cls(segment, Doorbell.create(), Doorbell.create())

    @classmethod
    def from_fds(cls, mem: int, ready: int, free: int, *, keep_fd: bool = True) -> FrameRing:
        """Open a ring handed over as descriptors (takes ownership of them)."""
        return cls(Segment(mem, keep_fd=keep_fd), Doorbell(ready), Doorbell(free))

    def fds(self) -> list[int]:
        if self.segment.fd is None:
            raise ValueError("this side of the ring gave its memory descriptor up")
        return [self.segment.fd, self.ready_bell.fd, self.free_bell.fd]

    def close(self) -> None:
        self._video.clear()
        self._audio.clear()
        for view in self._headers:
            view.release()
        self._headers.clear()
        self._words.release()
        self.segment.close()
        self.ready_bell.close()
        self.free_bell.close()

    @property
    def used(self) -> int:
        """Slots published and not yet released."""
        return self._words[_HEAD] - self._words[_TAIL]

    @property
    def free_slots(self) -> int:
        return self.geometry.slots - self.used

    # -- writer (renderer) -----------------------------------------------------
    def slot_for_write(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(video, audio)`` views of the next free slot, or ``None`` when full.

        Fill them (e.g. convert straight into ``video``), then :meth:`publish`.
        """
        head = self._words[_HEAD]
        if head - self._words[_TAIL] >= self.geometry.slots:
            return None
        i = head % self.geometry.slots
        return self._video[i], self._audio[i]

    def slots_for_write(self, n: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """``(video, audio)`` views of the next ``n`` free slots, or ``None`` if fewer are free.

        The renderer draws a batch straight into them; the ``k``-th is the slot
        the ``k``-th following :meth:`publish` publishes (publish them in order;
        the ones never published simply stay free).
        """
        head = self._words[_HEAD]
        if head - self._words[_TAIL] + n > self.geometry.slots:
            return None
        slots = self.geometry.slots
        return [
            (self._video[(head + k) % slots], self._audio[(head + k) % slots]) for k in range(n)
        ]

    def publish(self, *, epoch: int, pts: int, flags: int, n_audio: int = 0) -> int:
        """Publish the slot filled via :meth:`slot_for_write`; returns its ``seq``."""
        head = self._words[_HEAD]
        if head - self._words[_TAIL] >= self.geometry.slots:
            raise RuntimeError("publish() without a free slot")
        if not 0 <= n_audio <= self.geometry.max_audio:
            raise ValueError(f"{n_audio} samples do not fit a slot of {self.geometry.max_audio}")
        _SLOT.pack_into(
            self._headers[head % self.geometry.slots], 0, head, epoch, pts, flags, n_audio
        )
        self._words[_HEAD] = head + 1
        self.ready_bell.ring()
        return head

    def write(
        self,
        video: np.ndarray | None,
        audio: np.ndarray | None,
        *,
        epoch: int,
        pts: int,
        flags: int,
    ) -> bool:
        """Copy one frame and its audio into the next slot; ``False`` when full."""
        target = self.slot_for_write()
        if target is None:
            return False
        n_audio = 0 if audio is None else len(audio)
        if n_audio > self.geometry.max_audio:
            raise ValueError(f"{n_audio} samples do not fit a slot of {self.geometry.max_audio}")
        if video is not None:
            np.copyto(target[0], video.reshape(target[0].shape))
        if n_audio:
            target[1][:n_audio] = audio
        self.publish(epoch=epoch, pts=pts, flags=flags, n_audio=n_audio)
        return True

    # -- reader (session) ------------------------------------------------------
    def peek(self) -> FrameSlot | None:
        """The oldest unreleased slot, as views; ``None`` when empty."""
        tail = self._words[_TAIL]
        if tail == self._words[_HEAD]:
            return None
        i = tail % self.geometry.slots
        seq, epoch, pts, flags, n_audio = _SLOT.unpack_from(self._headers[i], 0)
        n_audio = min(n_audio, self.geometry.max_audio)
        return FrameSlot(seq, epoch, pts, flags, self._video[i], self._audio[i][:n_audio])

    def release(self) -> None:
        """Hand the oldest slot back to the renderer (after copying out of it)."""
        tail = self._words[_TAIL]
        if tail == self._words[_HEAD]:
            raise RuntimeError("release() with no slot to release")
        self._words[_TAIL] = tail + 1
        self.free_bell.ring()
