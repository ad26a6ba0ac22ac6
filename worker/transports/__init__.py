"""How a session enters its room: VideoSDK rooms, a WebRTC peer on 127.0.0.1, or the
in-process local room.  The contract is :class:`.base.RoomTransport`."""
