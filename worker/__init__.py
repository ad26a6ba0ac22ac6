"""The network side of the Avatar Server: protocol, session, synchronizer, tracks, dispatcher.

The public API mirrors videosdk-agents ``agents.avatar``.  Nothing here imports
torch or onnxruntime: the session process never runs inference.
"""

from .audio_in import AvatarAudioIn
from .audio_out import AvatarAudioOut
from .auth import (
    LINKED_AGENT_ID,
    AvatarAuthCredentials,
    AvatarJoinInfo,
    generate_avatar_credentials,
)
from .server import AvatarServer
from .synchronizer import AvatarSynchronizer
from .tracks import AvatarVisualTrack, AvatarVoiceTrack
from .types import AudioSegmentEnd, AvatarInput, AvatarRenderer, AvatarSettings

__all__ = [
    "LINKED_AGENT_ID",
    "AudioSegmentEnd",
    "AvatarAudioIn",
    "AvatarAudioOut",
    "AvatarAuthCredentials",
    "AvatarInput",
    "AvatarJoinInfo",
    "AvatarRenderer",
    "AvatarServer",
    "AvatarSettings",
    "AvatarSynchronizer",
    "AvatarVisualTrack",
    "AvatarVoiceTrack",
    "generate_avatar_credentials",
]
