"""One base for every listener the worker adds to a VideoSDK meeting.

The SDK's ``Meeting`` hands every meeting event to
``listener.handle_event(name, data)``, a ``@final`` method of the SDK's
``BaseEvent`` that maps the event name to an ``on_*`` method ("data" ->
``on_data``, "meeting-joined" -> ``on_meeting_joined`` ...).  A listener that
is not a ``MeetingEventHandler`` therefore fails inside the SDK on the first
event.  The test rooms (:mod:`worker.local_room`, :mod:`worker.webrtc_loopback`)
dispatch through the same ``handle_event``, so they fail the same way.

Why every ``on_*`` is guarded: the SDK calls listeners from inside its pyee
emitters with no guard of its own.  An exception there skips the remaining
listeners, can end the SDK's signalling loop, and, raised from the
``CLOSING`` state event that ``RoomClient.async_leave`` emits first, stops
the leave before the websocket and the transports are closed.  So a
:class:`RoomListener` logs and swallows whatever its handlers raise.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from videosdk import MeetingEventHandler

logger = logging.getLogger(__name__)


def _guarded(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            logger.exception("%s.%s raised; the room never sees it", type(self).__name__, name)
            return None

    call.__guarded__ = True  # type: ignore[attr-defined]
    return call


class RoomListener(MeetingEventHandler):
    """A ``videosdk.MeetingEventHandler`` whose ``on_*`` handlers never raise into the SDK."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if name.startswith("on_") and callable(value) and not hasattr(value, "__guarded__"):
                setattr(cls, name, _guarded(name, value))


class DataListener(RoomListener):
    """Hands the room's data messages (``on_data``) to one callback; ignores the rest."""

    def __init__(self, callback: Callable[[Any], None]) -> None:
        super().__init__()
        self._callback = callback

    def on_data(self, data: Any) -> None:
        self._callback(data)
