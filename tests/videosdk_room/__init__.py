"""A loopback VideoSDK room: a tiny mediasoup-like SFU the real ``videosdk`` SDK can join.

Everything runs on 127.0.0.1 inside the test process::

    async with LoopbackVideoSdkRoom(tmp_path) as room:
        os.environ.update(room.client_env())       # trust the room's throw-away CA
        meeting = VideoSDK.init_meeting(..., signaling_base_url=room.host)
        await meeting.async_join()
        await room.wait_for_peer("room-1", "peer-1")

``room.host`` serves ``POST /infra/v1/meetings/server-init-config`` (HTTPS, from a
thread: the SDK calls it with a blocking ``requests.post`` on its own event loop);
the answer's ``baseUrl`` is ``room.signaling_host``, the protoo websocket
(``wss://baseUrl/?roomId&peerId&secret&mode&peerType``, subprotocol ``protoo``), and
``iceServers`` is the SDK's AES encryption of ``[]`` (an empty string would not
decrypt).  Transports are ICE-lite + DTLS + SCTP endpoints built from vsaiortc's
ORTC objects; host candidates are 127.0.0.1 only (aioice skips loopback, so
``aioice.ice.get_host_addresses`` is patched while the room runs: in-process
clients get it too; a subprocess client must apply it itself).

Messages (protoo JSON; shapes taken from videosdk 0.4.1 ``room_client.py`` and
``lib/pymediasoup``):

======================== ============== ==============================================
method                   direction      data
======================== ============== ==============================================
getRouterRtpCapabilities client->room   answer: codecs opus/96, PCMU/0, PCMA/8,
                                        VP8/97 (+rtx 98), H264 42e01f/101 (+rtx 102);
                                        header extensions mid, ssrc-audio-level,
                                        abs-send-time, abs-capture-time (aiortc's ids)
createWebRtcTransport    client->room   answer: id, iceParameters (iceLite: true),
                                        iceCandidates (udp host 127.0.0.1),
                                        dtlsParameters (role auto, fingerprints),
                                        sctpParameters (port 5000, OS/MIS 1024,
                                        maxMessageSize 262144) if sctpCapabilities
connectWebRtcTransport   client->room   client dtlsParameters; the room takes the
                                        opposite DTLS role, starts ICE/DTLS/SCTP in
                                        the background; answer {}
requestEntry             client->room   answer {}; then notification entryResponded
entryResponded           room->client   notification {peerId, decision, sessionId}
join                     client->room   answer {peers: [{id, displayName, device,
                                        mode, peerType, metaData}], messages: []};
                                        then newPeer to the others and consumers of
                                        every existing producer for the newcomer
newPeer                  room->client   notification {id, displayName, device, mode,
                                        peerType (websocket query), metaData}
produce                  client->room   {transportId, kind, rtpParameters, appData};
                                        answer {id}; RTP is received, decoded and
                                        recorded; newConsumer to every other peer
produceData              client->room   {transportId, sctpStreamParameters, label,
                                        protocol, appData}; answer {id}; a
                                        negotiated channel on that stream id;
                                        newDataConsumer to every other peer
newConsumer              room->client   request {peerId, producerId, id, kind,
                                        rtpParameters (producer's media codec, no
                                        RTX, room's ssrc, mid "0","1",..), type
                                        "simple", appData {..., peerId},
                                        producerPaused false}; after ok the decoded
                                        track is re-encoded by an RTCRtpSender
newDataConsumer          room->client   request {peerId, dataProducerId, id,
                                        sctpStreamParameters (room's stream id,
                                        producer's ordered/maxRetransmits), label,
                                        protocol, appData}; messages are relayed
closeProducer            client->room   {producerId}; consumerClosed to consumers
consumerClosed           room->client   notification {consumerId}
dataConsumerClosed       room->client   notification {dataConsumerId} (SDK ignores)
resumeConsumer           client->room   answer {}
getTransportStats        client->room   answer {}
pubsubSubscribe          client->room   answer {messages: []}
removePeer               client->room   the target is closed (code 1000); answer {}
(anything else)          client->room   answer ok, {} (recording, agent state, ..)
peerClosed               room->client   notification {peerId} when a joined peer's
                                        websocket closes or it is kicked
close                    room->client   request, via ``room.close_peer()``: the SDK
                                        answers by calling leave()
======================== ============== ==============================================

A client leaves by closing its websocket (``async_leave``); the room then closes
its transports and producers and sends peerClosed.  ``kick()`` aborts the TCP
connection (or closes with 1000) and does the same.  Malformed JSON, non-object
messages and binary frames are counted in ``room.protocol_errors`` and ignored; a
failing handler answers ``ok: false`` (errorCode 500); a peer that disconnects
mid-join is cleaned up.  A second connection with a peer id already present
replaces the first (close code 4409).

Not modelled:

* authentication: the token/secret is not verified; modes (RECV_ONLY, ...) are
  recorded, not enforced; no entry requests needing approval, no room switching.
* real ICE-lite server behaviour beyond the basics: no TCP candidates, no ICE
  restart, no consent freshness from the room's side, no TURN/STUN.
* mediasoup's RTP layer: no payload-type/extension remapping (the router uses
  aiortc's own numbers, so the SDK's payload types pass through), no simulcast
  or SVC, no RTX/FEC towards consumers, no producer pause/resume, no bandwidth
  estimation, no keyframe requests between producer and consumer sides.  Media is
  decoded and re-encoded (a decoding relay, not packet forwarding), so consumers
  see re-encoded frames and extra latency.
* the room decodes published audio without aiortc's 80 ms jitter-buffer prefetch,
  so a recorded frame's arrival is its packets' arrival (a browser would add
  its own playout delay).
* consumers are never paused (resumeConsumer is a no-op), no consumer layers,
  scores, active speaker, recording, transcription, pubsub, chat history,
  participant media-state notifications, statsData requests.
* SCTP: maxRetransmits/maxPacketLifeTime are mirrored to the consumer side, but
  the loopback path does not lose packets, so "unreliable" never drops.
"""

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
