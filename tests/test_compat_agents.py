"""Wire compatibility with videosdk-agents: its own AvatarAudioOut drives our avatar.

videosdk-agents' avatar module imports only on Python 3.12, so the real agent
runs in a Python 3.12 virtual environment (created once, then reused), in a
subprocess started once for this file (tests/compat/agent_bridge.py).  Each
test connects to it over loopback TCP (tests/compat/wire.py) and gets a fresh
agent, bridged into the test's own LocalRoom::

    Python 3.12 process                       this test (Python 3.11+)
    ──────────────────────────────            ───────────────────────────────────────────
    videosdk.agents.avatar.AvatarAudioOut     AgentBridge ── LocalRoom "agent" participant
      │ meeting.send()   ──── send frames ──▶   │ agent.send() ──▶ AvatarAudioIn ─▶ ...
      │ _AvatarAckHandler ◀── data frames ────  │ on_data()    ◀── stream_ended
      └ _on_stream_ended ──── ack frames ───▶ AgentBridge.acks

The same scenario also runs with our AvatarAudioOut, so both agents are held
to the same expectations.  The interpreter comes from compat/py312.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest
from compat.py312 import python312
from compat.wire import frame, pack_payload, read_frame, unpack_payload
from conftest import AVATAR, SR, SessionHarness, locate, pcm, played_prefix, speech

from worker import protocol
from worker.listeners import DataListener

BRIDGE_SCRIPT = Path(__file__).parent / "compat" / "agent_bridge.py"


# -- the Python 3.12 environment ---------------------------------------------------------------


@pytest.fixture(scope="session")
def py312() -> Path:
    """A Python 3.12 interpreter with videosdk-agents installed (created on first use)."""
    return python312()


# -- the bridge -----------------------------------------------------------------------------------


class Agent(Protocol):
    """What the scenario needs from an agent-side AvatarAudioOut."""

    acks: list[tuple[float, bool]]

    async def handle_audio_input(self, audio: bytes) -> None: ...
    async def send_segment_end(self) -> None: ...
    async def interrupt(self) -> None: ...


class AgentBridge:
    """The test's end of the bridge: a real agent as the room's ``agent`` participant."""

    def __init__(self, harness: SessionHarness, port: int) -> None:
        self.harness = harness
        self.port = port
        self.acks: list[tuple[float, bool]] = []
        self.sent: list[tuple[bytes | str, str]] = []  # what the real agent put on the wire
        self._done: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> AgentBridge:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(frame({"op": "hello", "avatar_id": AVATAR}))
        # The room's agent participant is now the real agent, not our AvatarAudioOut.
        await self.harness.out.aclose()
        self.harness.agent.add_event_listener(DataListener(self.on_data))
        self._reader = asyncio.create_task(self._read(reader))
        return self

    async def _read(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header, body = await read_frame(reader)
                if header["op"] == "send":
                    payload = unpack_payload(header["kind"], body)
                    self.sent.append((payload, header["reliability"]))
                    await self.harness.agent.send(payload, {"reliability": header["reliability"]})
                elif header["op"] == "ack":
                    self.acks.append((header["playback_position"], header["interrupted"]))
                elif header["op"] == "done":
                    self._done.pop(header["id"]).set_result(None)

    def on_data(self, data: dict) -> None:
        """The room delivers to the agent: forward to the real agent's listeners."""
        kind, body = pack_payload(data["payload"])
        header = {key: data[key] for key in ("from", "timestamp", "reliability")}
        self._writer.write(frame({"op": "data", "kind": kind, **header}, body))

    async def _call(self, method: str, body: bytes | None = None) -> None:
        self._next_id += 1
        done = asyncio.get_running_loop().create_future()
        self._done[self._next_id] = done
        header = {"op": "call", "id": self._next_id, "method": method}
        header["with_body"] = body is not None
        self._writer.write(frame(header, body or b""))
        await asyncio.wait_for(done, timeout=30)

    async def handle_audio_input(self, audio: bytes) -> None:
        await self._call("handle_audio_input", audio)

    async def send_segment_end(self) -> None:
        await self._call("send_segment_end")

    async def interrupt(self) -> None:
        await self._call("interrupt")

    async def aclose(self) -> None:
        with contextlib.suppress(ConnectionError):
            self._writer.write(frame({"op": "close"}))
            await self._writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=10)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


@pytest.fixture(scope="module")
def agent_server(py312, tmp_path_factory):
    """A Python 3.12 process serving videosdk-agents' AvatarAudioOut: (port, log path)."""
    log = tmp_path_factory.mktemp("agent") / "agent.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(py312), str(BRIDGE_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    try:
        line = process.stdout.readline()  # "PORT <n>", or "" if it died
        if not line.startswith("PORT "):
            process.wait(timeout=30)
            pytest.fail(f"the Python 3.12 agent did not start:\n{line}{log.read_text()}")
        yield int(line.split()[1]), log
    finally:
        process.stdin.close()  # asks it to exit
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.fixture
async def real_agent(agent_server, make_session):
    """(session, bridge): our avatar in a LocalRoom, driven by videosdk-agents' AvatarAudioOut."""
    port, log = agent_server
    session = await make_session(speed=8.0)
    bridge = await AgentBridge(session, port).start()
    yield session, bridge
    await bridge.aclose()
    assert "Traceback" not in log.read_text(), log.read_text()


# -- the scenario, for either agent ---------------------------------------------------------------


async def _wait_acks(session: SessionHarness, agent: Agent, n: int) -> None:
    await session.wait_until(lambda: len(agent.acks) >= n, f"{n} ack(s) at the agent")


async def run_scenario(session: SessionHarness, agent: Agent) -> None:
    """Three turns: a whole one, an interrupted one, one with a silent stretch."""
    first = speech(2 * SR, seed=1)
    second = speech(3 * SR, seed=2)
    pause = np.zeros(7200, np.int16)  # 300 ms of digital silence: arrives as str
    third = np.concatenate([speech(7200, seed=3), pause, speech(7200, seed=4)])

    await agent.handle_audio_input(pcm(first))
    await agent.send_segment_end()
    await _wait_acks(session, agent, 1)

    await agent.handle_audio_input(pcm(second))
    await agent.send_segment_end()
    target = session.stats.speech_samples + SR
    await session.wait_until(lambda: session.stats.speech_samples >= target, "1 s of turn 2")
    await agent.interrupt()
    await agent.interrupt()  # one barge-in, two messages
    await _wait_acks(session, agent, 2)
    await session.sleep(0.4)

    await agent.handle_audio_input(pcm(third))
    await agent.send_segment_end()
    await _wait_acks(session, agent, 3)
    await session.settle()

    played = session.played()
    assert locate(played, first) is not None
    _, length = played_prefix(played, second)
    assert 0 < length < len(second)
    assert locate(played, third) is not None  # its silent stretch included
    # bytes in == bytes played, for every turn that was not cut short
    assert np.count_nonzero(played) == len(first) + length + np.count_nonzero(third)
    assert agent.acks == [(2.0, False), (length / SR, True), (0.9, False)]
    assert session.resets == 1


async def test_real_agent_drives_our_avatar(real_agent) -> None:
    session, bridge = real_agent
    await run_scenario(session, bridge)
    # What the real agent sent is what our protocol module expects.
    audio = [p for p, mode in bridge.sent if mode == protocol.UNRELIABLE]
    assert audio and all(len(p) <= protocol.MAX_AUDIO_CHUNK for p in audio)
    control = [p for p, mode in bridge.sent if mode == protocol.RELIABLE]
    assert control.count(protocol.segment_end()) == 3
    assert control.count(protocol.INTERRUPT) == 2


async def test_our_agent_drives_our_avatar(make_session) -> None:
    session = await make_session(speed=8.0)
    await run_scenario(session, session.out)


async def test_real_agent_ignores_a_malformed_ack_and_takes_ours(real_agent) -> None:
    session, bridge = real_agent
    await session.avatar.send("{not json", {"reliability": protocol.RELIABLE})
    await session.avatar.send(protocol.stream_ended(1.25, True), {"reliability": "RELIABLE"})
    await session.wait_until(lambda: bridge.acks, "the ack at the agent")
    assert bridge.acks == [(1.25, True)]


async def test_real_agent_silence_reaches_our_avatar_as_audio(real_agent) -> None:
    session, bridge = real_agent
    await bridge.handle_audio_input(bytes(SR))  # 0.5 s of digital silence: arrives as str
    await bridge.send_segment_end()
    await session.wait_until(lambda: bridge.acks, "the ack at the agent")
    assert bridge.acks == [(0.5, False)]
    assert all(isinstance(p, bytes) for p, mode in bridge.sent if mode == protocol.UNRELIABLE)
