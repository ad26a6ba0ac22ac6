"""A loopback VideoSDK room for tests (docstring completed below)."""

from .records import DataMessage, MediaFrame, PeerRecord, ProducerRecord
from .server import LoopbackVideoSdkRoom, encrypt_ice_servers
from .transports import loopback_ice, patch_loopback_ice

__all__ = [
    "DataMessage",
    "LoopbackVideoSdkRoom",
    "MediaFrame",
    "PeerRecord",
    "ProducerRecord",
    "encrypt_ice_servers",
    "loopback_ice",
    "patch_loopback_ice",
]
