"""A real videosdk-agents agent in a VideoSDK room, driven by a test over stdin/stdout.

Usage (Python 3.12 with ``videosdk-agents`` installed)::

    python live_agent.py --room ROOM --host 127.0.0.1:PORT --dispatcher URL \\
        --avatar-id ID --avatar-token JWT --agent-token TOKEN

Nothing here stands in for the agent: ``JobContext.connect()`` does what it does
in production (the context is made current, as ``WorkerJob`` does).  It POSTs
the avatar's join to the dispatcher (``AvatarAudioOut.connect()``), joins the
room with the ``videosdk`` SDK through its own room layer (``VideoSDKHandler``,
peer type ``agent``) and, once joined, hands the meeting to
``AvatarAudioOut._set_meeting`` (``notify_meeting_joined``).
The only changes to the process: ICE host candidates are gathered on 127.0.0.1
(aioice skips loopback by default) and the test's CA is trusted through
``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``, set by the test.

Commands, one JSON object a line on stdin::

    {"op": "speak", "pcm": "<file of s16le 24 kHz mono>", "chunk_ms": 40, "pace": 2.0}
    {"op": "segment_end"}            {"op": "interrupt"}            {"op": "leave"}

``speak`` hands the audio to ``AvatarAudioOut.handle_audio_input`` in chunks of
``chunk_ms`` (as a TTS sink does), ``pace`` times faster than real time (0: all
at once), in the background; the next command waits for it, except
``interrupt``, which cancels it first (a barge-in stops synthesis).  Events, one
JSON object a line on stdout, each with ``t`` (``time.monotonic()``, comparable
across processes on Linux)::

    {"ev": "joined"}   {"ev": "done", "op": ...}   {"ev": "ack", "position": s, "interrupted": b}
    {"ev": "error", "message": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

import aioice.ice
from videosdk.agents import JobContext, RoomOptions
from videosdk.agents.avatar import AvatarAudioOut, AvatarAuthCredentials
from videosdk.agents.job import _set_current_job_context

SAMPLE_RATE = 24_000


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"ev": event, "t": time.monotonic(), **fields}), flush=True)


# worker.ice does this for the avatar side; this venv (3.12, the agent) has no worker package.
def loopback_only(use_ipv4: bool = True, use_ipv6: bool = False) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


async def speak(out: AvatarAudioOut, command: dict) -> float:
    with open(command["pcm"], "rb") as f:
        pcm = f.read()
    chunk = int(SAMPLE_RATE * command.get("chunk_ms", 40) / 1000) * 2
    pace = float(command.get("pace", 0))
    start = time.monotonic()
    late = 0.0  # how far behind its schedule a chunk was handed over, at worst
    for i in range(0, len(pcm), chunk):
        if pace > 0:
            late = max(late, time.monotonic() - (start + i / 2 / SAMPLE_RATE / pace))
        await out.handle_audio_input(pcm[i : i + chunk])
        if pace > 0:
            due = start + (i + chunk) / 2 / SAMPLE_RATE / pace
            await asyncio.sleep(max(0.0, due - time.monotonic()))
    return late


async def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("room", "host", "dispatcher", "avatar-id", "avatar-token", "agent-token"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--agent-id", default="agent-1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    aioice.ice.get_host_addresses = loopback_only

    out = AvatarAudioOut(
        credentials=AvatarAuthCredentials(participant_id=args.avatar_id, token=args.avatar_token),
        avatar_dispatcher_url=args.dispatcher,
    )
    # Where the real ack handler (_AvatarAckHandler) delivers stream_ended.
    out._on_stream_ended = lambda position, interrupted: emit(
        "ack", position=position, interrupted=interrupted
    )
    ctx = JobContext(
        room_options=RoomOptions(
            room_id=args.room,
            auth_token=args.agent_token,
            name="Agent",
            agent_participant_id=args.agent_id,
            playground=False,
            signaling_base_url=args.host,
            avatar=out,
            auto_end_session=False,
            no_participant_timeout_seconds=None,
        )
    )
    _set_current_job_context(ctx)  # what WorkerJob does before it runs an entrypoint
    try:
        await ctx.connect()
        if not await ctx.wait_for_meeting_joined(timeout=30):
            emit("error", message="the agent did not join the room")
            return 1
    except Exception as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    emit("joined")

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    speaking: asyncio.Task | None = None
    while line := await reader.readline():
        command = json.loads(line)
        op = command["op"]
        if op == "speak":
            speaking = asyncio.create_task(speak(out, command))
            speaking.add_done_callback(
                lambda task: emit(
                    "done",
                    op="speak",
                    cancelled=task.cancelled(),
                    late_ms=None if task.cancelled() else round(task.result() * 1000, 1),
                )
            )
            continue
        if speaking is not None and not speaking.done():
            if op == "interrupt":  # a barge-in cancels synthesis, then tells the avatar
                speaking.cancel()
            await asyncio.wait({speaking})
        if op == "segment_end":
            await out.send_segment_end()
        elif op == "interrupt":
            await out.interrupt()
        elif op == "leave":
            break
        emit("done", op=op)
    await ctx.room.leave()
    emit("done", op="leave")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
