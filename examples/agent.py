"""A videosdk-agents voice agent whose face and voice come from this Avatar Server.

The agent runs as usual; the only change is ``RoomOptions(avatar=...)``: an
``AvatarAudioOut`` that asks our dispatcher to send the avatar into the room,
then streams the agent's speech to it over the room's data channel.  The
user sees and hears the avatar participant.

Run (Python 3.12, ``pip install videosdk-agents videosdk-plugins-openai``)::

    export VIDEOSDK_API_KEY=... VIDEOSDK_SECRET_KEY=...  # the same pair the server has
    export VIDEOSDK_ROOM_ID=...                           # the room to join
    export OPENAI_API_KEY=...
    export AVATAR_DISPATCHER_URL=http://127.0.0.1:8089/launch  # 'avatar-server serve'
    python examples/agent.py

The avatar's join token is signed here with the VideoSDK secret; the server
verifies it with the same secret, so no other credential is shared.
"""

from __future__ import annotations

import os

from videosdk.agents import Agent, AgentSession, JobContext, Pipeline, RoomOptions, WorkerJob
from videosdk.agents.avatar import AvatarAudioOut, generate_avatar_credentials

DISPATCHER_URL = os.environ.get("AVATAR_DISPATCHER_URL", "http://127.0.0.1:8089/launch")


class AvatarAgent(Agent):
    def __init__(self) -> None:
        super().__init__(
            instructions="You are a friendly assistant with a face. Keep answers short."
        )

    async def on_enter(self) -> None:
        await self.session.say("Hello! How can I help you today?")

    async def on_exit(self) -> None:
        await self.session.say("Goodbye!")


def make_avatar(dispatcher_url: str = DISPATCHER_URL) -> AvatarAudioOut:
    """The agent's handle on the avatar: pre-signed credentials and the dispatcher's URL."""
    credentials = generate_avatar_credentials(
        os.environ["VIDEOSDK_API_KEY"],
        os.environ["VIDEOSDK_SECRET_KEY"],
        ttl_seconds=3600,
    )
    return AvatarAudioOut(credentials=credentials, avatar_dispatcher_url=dispatcher_url)


def make_pipeline() -> Pipeline:
    """A speech-to-speech pipeline (any STT/LLM/TTS combination works the same way)."""
    from videosdk.plugins.openai import OpenAIRealtime, OpenAIRealtimeConfig

    model = OpenAIRealtime(
        model="gpt-realtime-2025-08-28",
        config=OpenAIRealtimeConfig(voice="alloy", modalities=["audio"]),
    )
    return Pipeline(llm=model)


def make_context() -> JobContext:
    return JobContext(
        room_options=RoomOptions(
            room_id=os.environ["VIDEOSDK_ROOM_ID"],
            name="Avatar Agent",
            avatar=make_avatar(),
            playground=True,
        )
    )


async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(agent=AvatarAgent(), pipeline=make_pipeline())
    await session.start(wait_for_participant=True, run_until_shutdown=True)


if __name__ == "__main__":
    WorkerJob(entrypoint=entrypoint, jobctx=make_context).start()
