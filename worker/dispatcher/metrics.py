"""Prometheus metrics of the dispatcher and its sessions (``GET /metrics``).

Session processes report totals once a second (:class:`~.messages.Stats`);
:meth:`Metrics.session_stats` turns them into counter increments, so the
counters survive sessions coming and going.  Per-session gauges carry a
``session`` label and are removed when the session ends, so their number
never exceeds ``max_sessions``.  Each :class:`Metrics` has its own registry
(several dispatchers can live in one test process).
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .messages import Stats

CONTENT_TYPE = CONTENT_TYPE_LATEST

_COUNTED = {
    "frames_shown": "avatar_frames_shown",
    "frames_late": "avatar_frames_late",
    "frames_dropped": "avatar_frames_dropped",
    "stalls": "avatar_stalls",
    "interrupts": "avatar_interrupts",
    "segments": "avatar_segments",
}

_HELP = {
    "frames_shown": "Speech frames shown by the visual track",
    "frames_late": "Video ticks that repeated the last frame because the renderer was late",
    "frames_dropped": "Speech frames dropped because their time had passed",
    "stalls": "Times the playout buffer ran dry in the middle of a segment",
    "interrupts": "Interrupts (barge-ins) handled",
    "segments": "Speech segments played to the end",
}

# AvatarAudioIn.stats (totals of what came from the agent) -> counter name, help
_AUDIO_IN = {
    "audio_bytes": ("avatar_audio_in_bytes", "PCM bytes received from the agent and played"),
    "dropped_after_interrupt": (
        "avatar_audio_in_dropped_after_interrupt_bytes",
        "PCM bytes dropped because they were sent before an interrupt took effect",
    ),
    "ignored": (
        "avatar_audio_in_ignored_messages",
        "Data messages ignored because they were not from the agent",
    ),
    "malformed": (
        "avatar_audio_in_malformed_messages",
        "Data messages from the agent dropped as malformed",
    ),
    "held": (
        "avatar_audio_in_held_messages",
        "Data messages held until the room named the agent",
    ),
    "dropped_while_held": (
        "avatar_audio_in_dropped_while_held_messages",
        "Data messages dropped because the hold buffer was full",
    ),
}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.sessions = Gauge("avatar_sessions", "Sessions holding a slot", registry=r)
        self.free_slots = Gauge("avatar_free_slots", "Slots free for new joins", registry=r)
        self.renderer_up = Gauge("avatar_renderer_up", "1 while the renderer can serve", registry=r)
        self.joins = Counter(
            "avatar_join_requests", "Join requests by outcome", ["outcome"], registry=r
        )
        self.ends = Counter(
            "avatar_session_ends", "Sessions ended, by reason", ["reason"], registry=r
        )
        self.join_seconds = Histogram(
            "avatar_join_seconds",
            "Join request to room joined",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30),
            registry=r,
        )
        self.first_frame_seconds = Histogram(
            "avatar_first_frame_seconds",
            "Join request to the first video frame handed to the sender",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.output_fps = Gauge(
            "avatar_output_fps", "Video frames sent per second", ["session"], registry=r
        )
        self.ring_depth = Gauge(
            "avatar_ring_depth",
            "Items waiting in a session's buffers (playout: frames; rings: as reported)",
            ["session", "ring"],
            registry=r,
        )
        self.render_ms = Histogram(
            "avatar_render_ms_per_frame",
            "Render time per frame, milliseconds",
            buckets=(1, 2, 5, 10, 20, 30, 40, 60, 100, 200, 500),
            registry=r,
        )
        self.av_offset_ms = Histogram(
            "avatar_av_offset_ms",
            "Video tick minus the start of its frame's audio, milliseconds",
            buckets=(-80, -40, -20, -10, -5, 0, 5, 10, 20, 40, 80),
            registry=r,
        )
        self.counters = {
            key: Counter(name, _HELP[key], registry=r) for key, name in _COUNTED.items()
        }
        self.audio_in = {
            key: Counter(name, text, registry=r) for key, (name, text) in _AUDIO_IN.items()
        }
        self.audio_in_other = Counter(
            "avatar_audio_in_other",
            "Other counters of the session's AvatarAudioIn, by name",
            ["counter"],
            registry=r,
        )
        self.weight_swaps = Counter(
            "avatar_weight_swaps", "Weight swap requests by result", ["result"], registry=r
        )
        self._last: dict[str, Stats] = {}

    def session_stats(self, session_id: str, stats: Stats) -> None:
        last = self._last.get(session_id, Stats())
        for key, counter in self.counters.items():
            delta = getattr(stats, key) - getattr(last, key)
            if delta > 0:
                counter.inc(delta)
        for key, value in stats.audio_in.items():
            delta = value - last.audio_in.get(key, 0)
            if delta <= 0:
                continue
            if key in self.audio_in:
                self.audio_in[key].inc(delta)
            else:
                self.audio_in_other.labels(key).inc(delta)
        self._last[session_id] = stats
        self.output_fps.labels(session_id).set(stats.fps)
        self.ring_depth.labels(session_id, "playout").set(stats.playout_depth)
        for ring, depth in stats.ring_depths.items():
            self.ring_depth.labels(session_id, ring).set(depth)
        for value in stats.render_ms:
            self.render_ms.observe(value)
        for value in stats.av_offset_ms:
            self.av_offset_ms.observe(value)

    def session_ended(self, session_id: str, reason: str) -> None:
        self.ends.labels(reason).inc()
        last = self._last.pop(session_id, None)
        with contextlib.suppress(KeyError):
            self.output_fps.remove(session_id)
        for ring in ["playout", *(last.ring_depths if last else ())]:
            with contextlib.suppress(KeyError):
                self.ring_depth.remove(session_id, ring)

    def render(self) -> bytes:
        return generate_latest(self.registry)
