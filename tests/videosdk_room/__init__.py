"""A loopback VideoSDK room for tests (docstring completed below)."""

from .init_config import encrypt_ice_servers
from .records import DataMessage, MediaFrame, PeerRecord, ProducerRecord
from .server import LoopbackVideoSdkRoom
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
