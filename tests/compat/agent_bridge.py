"""Serve videosdk-agents' own ``AvatarAudioOut`` to tests, over loopback TCP.

Usage (Python 3.12 with ``videosdk-agents`` installed)::

    python agent_bridge.py

It listens on ``127.0.0.1`` (a free port, printed as ``PORT <n>`` on stdout)
until it is terminated or its stdin closes.  Every connection gets a fresh,
real ``AvatarAudioOut`` attached to a meeting object with the surface it uses
(``id``, ``send``, ``add_event_listener``, ``remove_event_listener``):
``send`` becomes a ``send`` frame for the test, which puts it into its room;
``data`` frames from the test are handed to the registered listeners exactly
as ``videosdk.Meeting`` does: ``listener.handle_event("data", data)``, with no
guard (a listener that is not a ``MeetingEventHandler``, or that raises, fails
here as it would in a real room).  Not modelled: the SDK's signalling, peer
events, media and join; only the data channel.  The test drives the agent with ``call`` frames.
Acks are captured where the real ``_AvatarAckHandler`` delivers them
(``AvatarAudioOut._on_stream_ended``) and reported with ``ack`` frames.
The first frame of a connection is ``hello`` with the avatar's participant id.
See wire.py for the frames.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from videosdk.agents.avatar import AvatarAudioOut, AvatarAuthCredentials
from wire import frame, pack_payload, read_frame, unpack_payload

logger = logging.getLogger("agent_bridge")


class BridgedMeeting:
    """The subset of ``videosdk.Meeting`` that AvatarAudioOut uses."""

    id = "bridged-room"

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.listeners: list[Any] = []

    async def send(self, payload: Any, options: dict) -> None:
        if not isinstance(payload, bytes | str):
            raise TypeError(f"only string and bytes are allowed, got {type(payload).__name__}")
        kind, body = pack_payload(payload)
        reliability = options.get("reliability")
        self._writer.write(frame({"op": "send", "kind": kind, "reliability": reliability}, body))
        await self._writer.drain()

    def add_event_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def remove_event_listener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def dispatch(self, data: dict) -> None:
        # What ``Meeting.__emit`` does: ``handle_event`` on each listener, unguarded.
        for listener in list(self.listeners):
            listener.handle_event("data", data)


async def serve_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    header, _ = await read_frame(reader)
    meeting = BridgedMeeting(writer)
    out = AvatarAudioOut(
        credentials=AvatarAuthCredentials(participant_id=header["avatar_id"], token="-")
    )

    def on_stream_ended(playback_position: float, interrupted: bool) -> None:
        ack = {"op": "ack", "playback_position": playback_position, "interrupted": interrupted}
        writer.write(frame(ack))

    out._on_stream_ended = on_stream_ended  # the real ack handler calls this
    out._set_meeting(meeting)
    try:
        while True:
            header, body = await read_frame(reader)
            op = header["op"]
            if op == "data":
                data = {key: header[key] for key in ("from", "timestamp", "reliability")}
                data["payload"] = unpack_payload(header["kind"], body)
                meeting.dispatch(data)
            elif op == "call":
                method = getattr(out, header["method"])
                await (method(body) if header.get("with_body") else method())
                writer.write(frame({"op": "done", "id": header["id"]}))
            elif op == "close":
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        await out.aclose()
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(serve_agent, "127.0.0.1", 0)
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    server.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
