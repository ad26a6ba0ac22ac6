"""What the room records: peers, the media they publish, the data messages it relays."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

VideoReducer = Callable[[Any], Any]  # av.VideoFrame -> whatever is kept per frame


@dataclass
class ProducerRecord:
    id: str
    kind: str  # "audio" | "video"
    codec: str  # mime type, e.g. "audio/opus"
    created_at: float  # time.monotonic()
    closed_at: float | None = None
    app_data: dict[str, Any] = field(default_factory=dict)


@dataclass
class PeerRecord:
    room_id: str
    peer_id: str
    peer_type: str  # from the websocket query (peerType)
    mode: str  # from the websocket query (mode)
    connected_at: float  # time.monotonic() of the websocket accept
    display_name: str | None = None
    device: str | None = None
    meta_data: Any = None
    joined_at: float | None = None  # the join request was answered
    left_at: float | None = None  # websocket closed or kicked
    ws_closed: bool = False
    kicked: bool = False
    producers: dict[str, ProducerRecord] = field(default_factory=dict)
    data_producers: dict[str, str] = field(default_factory=dict)  # id -> label
    requests: list[str] = field(default_factory=list)  # methods, in arrival order

    @property
    def joined(self) -> bool:
        return self.joined_at is not None

    @property
    def left(self) -> bool:
        return self.left_at is not None


@dataclass(frozen=True)
class MediaFrame:
    """One decoded frame a peer published, as the room received it.

    audio ``data``: int16 mono PCM at the decoder's rate (48 kHz for Opus,
    8 kHz for PCMU/PCMA), ``sample_rate`` says which.  video ``data``: the frame
    as a uint8 gray ndarray (H, W), or what ``video_reducer`` returned.
    """

    arrival: float  # time.monotonic() when the room had it decoded
    pts: int | None
    time_base: Fraction | None
    data: Any
    sample_rate: int | None = None


@dataclass(frozen=True)
class DataMessage:
    arrival: float
    room_id: str
    from_peer: str
    label: str  # "reliable_data_producer" | "unreliable_data_producer"
    payload: bytes | str


def reduce_audio(frame: Any) -> np.ndarray:
    """av.AudioFrame -> int16 mono (first channel of interleaved/planar s16)."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        mono = arr[0]
    else:
        mono = arr.reshape(-1, channels)[:, 0] if channels > 1 else arr.reshape(-1)
    if mono.dtype != np.int16:
        if np.issubdtype(mono.dtype, np.floating):
            mono = np.clip(mono * 32767.0, -32768, 32767)
        mono = mono.astype(np.int16)
    return np.ascontiguousarray(mono)


def reduce_video_gray(frame: Any) -> np.ndarray:
    return frame.to_ndarray(format="gray")


def now() -> float:
    return time.monotonic()
