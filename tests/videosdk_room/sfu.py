"""The SFU half of the room: protoo request handlers, media and data forwarding."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from vsaiortc import RTCDataChannel, RTCDataChannelParameters, RTCRtpReceiver, RTCRtpSender
from vsaiortc.contrib.media import MediaRelay
from vsaiortc.jitterbuffer import JitterBuffer
from vsaiortc.mediastreams import MediaStreamError, MediaStreamTrack
from vsaiortc.rtcrtpreceiver import RemoteStreamTrack

from .peers import Consumer, DataConsumer, DataProducer, Peer, Producer, Reject
from .records import DataMessage, MediaFrame, ProducerRecord, VideoReducer, now, reduce_audio
from .transports import (
    ROUTER_RTP_CAPABILITIES,
    ServerTransport,
    consumer_rtp_parameters,
    receive_parameters,
    send_parameters,
)

logger = logging.getLogger(__name__)

MediaSink = Callable[[str, str, str, MediaFrame], None]  # (room, peer, kind, frame)
CONNECT_TIMEOUT = 20.0
KEYFRAME_REQUESTS = 40  # PLIs sent until a new video producer's first frame decodes
KEYFRAME_INTERVAL = 0.25


class TappedTrack(MediaStreamTrack):
    """A producer's decoded track that shows each frame to ``on_frame`` before anyone else.

    Consumers' senders re-encode the very frame objects the relay hands out, and
    PyAV's encoder rebases a frame's ``pts`` to its own time base in place, so
    the recorder must read a frame before the relay passes it on.
    """

    def __init__(self, source: MediaStreamTrack, on_frame: Callable[[Any], None]) -> None:
        super().__init__()
        self.kind = source.kind
        self._source = source
        self._on_frame = on_frame

    async def recv(self) -> Any:
        frame = await self._source.recv()
        self._on_frame(frame)
        return frame

    def stop(self) -> None:
        self._source.stop()
        super().stop()


class Sfu:
    """Mixin: everything a request or a departure does to the room's state."""

    _rooms: dict[str, dict[str, Peer]]
    _relay: MediaRelay
    _sink: MediaSink
    _record_media: bool
    _forward_kinds: frozenset[str]  # media kinds relayed to consumers
    _video_reducer: VideoReducer
    _data: dict[str, list[DataMessage]]
    _tasks: set[asyncio.Task[Any]]

    def _spawn(self, owner: set[asyncio.Task[Any]], coro: Awaitable[Any]) -> None:
        raise NotImplementedError

    async def _notify(self, peer: Peer, method: str, data: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _request(self, peer: Peer, method: str, data: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def kick(self, room_id: str, peer_id: str, *, abrupt: bool = True) -> None:
        raise NotImplementedError

    def _record_frame(self, room_id: str, peer_id: str, kind: str, frame: MediaFrame) -> None:
        raise NotImplementedError

    # -- request handlers ----------------------------------------------------------------------

    async def _on_get_router_rtp_capabilities(
        self, peer: Peer, data: dict[str, Any]
    ) -> dict[str, Any]:
        return json.loads(json.dumps(ROUTER_RTP_CAPABILITIES))

    async def _on_create_transport(self, peer: Peer, data: dict[str, Any]) -> dict[str, Any]:
        transport = ServerTransport(
            producing=bool(data.get("producing")),
            sctp=data.get("sctpCapabilities") is not None,
        )
        await transport.gather()
        if peer.closed:
            await transport.close()
            raise Reject(410, "peer gone")
        peer.transports[transport.id] = transport
        if data.get("consuming"):
            peer.recv_transport = transport
        return transport.describe()

    def _transport(self, peer: Peer, data: dict[str, Any]) -> ServerTransport:
        transport = peer.transports.get(str(data.get("transportId")))
        if transport is None:
            raise Reject(404, f"no transport {data.get('transportId')!r}")
        return transport

    async def _on_connect_transport(self, peer: Peer, data: dict[str, Any]) -> dict[str, Any]:
        transport = self._transport(peer, data)
        dtls = data.get("dtlsParameters")
        if not isinstance(dtls, dict) or not dtls.get("fingerprints"):
            raise Reject(400, "dtlsParameters with fingerprints required")
        transport.connect(dtls)
        return {}

    async def _on_request_entry(self, peer: Peer, data: dict[str, Any]) -> Any:
        async def after() -> None:
            await self._notify(
                peer,
                "entryResponded",
                {"peerId": peer.peer_id, "decision": "allowed", "sessionId": self._session(peer)},
            )

        return {}, after

    def _session(self, peer: Peer) -> str:
        return f"session-{peer.room_id}"

    async def _on_join(self, peer: Peer, data: dict[str, Any]) -> Any:
        record = peer.record
        record.display_name = data.get("displayName")
        record.device = data.get("device")
        record.meta_data = data.get("metaData")
        others = [p for p in self._rooms.get(peer.room_id, {}).values() if p is not peer]
        joined = [p for p in others if p.joined]
        record.joined_at = now()

        async def after() -> None:
            for other in joined:
                await self._notify(other, "newPeer", peer.info())
            for other in joined:
                for producer in list(other.producers.values()):
                    self._spawn(peer.tasks, self._consume(peer, producer))
                for data_producer in list(other.data_producers.values()):
                    self._spawn(peer.tasks, self._consume_data(peer, data_producer))

        return {"peers": [p.info() for p in joined], "messages": []}, after

    async def _on_produce(self, peer: Peer, data: dict[str, Any]) -> Any:
        transport = self._transport(peer, data)
        kind = data.get("kind")
        rtp = data.get("rtpParameters")
        if kind not in ("audio", "video") or not isinstance(rtp, dict):
            raise Reject(400, "kind and rtpParameters required")
        try:
            params = receive_parameters(rtp)
        except (KeyError, TypeError, ValueError, StopIteration) as exc:
            raise Reject(400, f"bad rtpParameters: {exc}") from None
        receiver = RTCRtpReceiver(kind, transport.dtls)
        if kind == "audio":
            # aiortc holds 4 packets (80 ms) back before decoding audio; without that
            # prefetch a frame's arrival is when its packet arrived (loopback: no jitter).
            receiver._RTCRtpReceiver__jitter_buffer = JitterBuffer(capacity=16, prefetch=0)
        track = RemoteStreamTrack(kind=kind, track_buffer_size=256)
        receiver._track = track
        receiver._set_rtcp_ssrc(random.randint(1, 2**32 - 1))
        producer_id = str(uuid.uuid4())
        record = ProducerRecord(
            id=producer_id,
            kind=kind,
            codec=params.codecs[0].mimeType,
            created_at=now(),
            app_data=dict(data.get("appData") or {}),
        )
        producer = Producer(
            id=producer_id,
            peer=peer,
            kind=kind,
            rtp=rtp,
            app_data=record.app_data,
            transport=transport,
            receiver=receiver,
            track=track,
            record=record,
        )
        producer.track = TappedTrack(track, lambda frame: self._on_frame(producer, frame))
        peer.producers[producer_id] = producer
        peer.record.producers[producer_id] = record
        self._spawn(producer.tasks, self._run_producer(producer, params))

        async def after() -> None:
            for other in self._rooms.get(peer.room_id, {}).values():
                if other is not peer and other.joined:
                    self._spawn(other.tasks, self._consume(other, producer))

        return {"id": producer_id}, after

    async def _run_producer(self, producer: Producer, params: Any) -> None:
        # Register at once: the client's RTP flows from its DTLS handshake on, often
        # before this request, and packets for an unregistered SSRC are dropped.
        await producer.receiver.receive(params)
        if producer.kind == "video":
            self._spawn(producer.tasks, self._request_keyframes(producer, params))
        if not self._record_media and self._sink == self._record_frame:
            return
        # Keeps frames flowing (and recorded, by the tap) whether or not anyone consumes.
        proxy = self._relay.subscribe(producer.track, buffered=True)
        try:
            while True:
                try:
                    await proxy.recv()
                except MediaStreamError:
                    break
        finally:
            proxy.stop()

    def _on_frame(self, producer: Producer, frame: Any) -> None:
        producer.frames += 1
        if not self._record_media and self._sink == self._record_frame:
            return
        if producer.kind == "audio":
            data: Any = reduce_audio(frame)
            rate: int | None = frame.sample_rate
        else:
            data, rate = self._video_reducer(frame), None
        media = MediaFrame(
            arrival=now(), pts=frame.pts, time_base=frame.time_base, data=data, sample_rate=rate
        )
        self._sink(producer.peer.room_id, producer.peer.peer_id, producer.kind, media)

    async def _request_keyframes(self, producer: Producer, params: Any) -> None:
        """PLI until a frame decodes: the first keyframe may have arrived unregistered."""
        try:
            await asyncio.wait_for(producer.transport.connected.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            logger.warning("producer %s: transport never connected", producer.id)
            return
        for _ in range(KEYFRAME_REQUESTS):
            if producer.closed or producer.frames > 0:
                return
            for encoding in params.encodings:
                await producer.receiver._send_rtcp_pli(encoding.ssrc)
            await asyncio.sleep(KEYFRAME_INTERVAL)

    async def _on_close_producer(self, peer: Peer, data: dict[str, Any]) -> dict[str, Any]:
        producer = peer.producers.pop(str(data.get("producerId")), None)
        if producer is not None:
            await self._close_producer(producer)
        return {}

    async def _close_producer(self, producer: Producer) -> None:
        if producer.closed:
            return
        producer.closed = True
        producer.record.closed_at = now()
        for consumer in list(producer.consumers):
            await self._close_consumer(consumer, notify=True)
        with contextlib.suppress(Exception):
            await producer.receiver.stop()
        producer.track.stop()
        for task in list(producer.tasks):
            task.cancel()

    async def _close_consumer(self, consumer: Consumer, *, notify: bool) -> None:
        if consumer.closed:
            return
        consumer.closed = True
        consumer.producer.consumers.discard(consumer)
        consumer.peer.consumers.pop(consumer.id, None)
        consumer.track.stop()
        with contextlib.suppress(Exception):
            await consumer.sender.stop()
        if notify:
            await self._notify(consumer.peer, "consumerClosed", {"consumerId": consumer.id})

    async def _consume(self, peer: Peer, producer: Producer) -> None:
        """newConsumer: relay the producer's decoded track to ``peer``'s recv transport."""
        transport = peer.recv_transport
        if producer.kind not in self._forward_kinds or transport is None:
            return
        if peer.closed or producer.closed:
            return
        track = self._relay.subscribe(producer.track, buffered=False)
        sender = RTCRtpSender(track, transport.dtls)
        mid = str(peer.next_mid)
        peer.next_mid += 1
        rtcp = producer.rtp.get("rtcp") or {}
        rtp = consumer_rtp_parameters(
            producer.rtp,
            mid=mid,
            ssrc=sender._ssrc,
            cname=rtcp.get("cname") or producer.peer.peer_id,
        )
        consumer = Consumer(
            id=str(uuid.uuid4()), peer=peer, producer=producer, sender=sender, track=track
        )
        producer.consumers.add(consumer)
        peer.consumers[consumer.id] = consumer
        try:
            await self._request(
                peer,
                "newConsumer",
                {
                    "peerId": producer.peer.peer_id,
                    "producerId": producer.id,
                    "id": consumer.id,
                    "kind": producer.kind,
                    "rtpParameters": rtp,
                    "type": "simple",
                    "appData": {**producer.app_data, "peerId": producer.peer.peer_id},
                    "producerPaused": False,
                },
            )
            await asyncio.wait_for(transport.connected.wait(), CONNECT_TIMEOUT)
        except Exception as exc:
            logger.info("peer %s did not take consumer %s: %r", peer.peer_id, consumer.id, exc)
            await self._close_consumer(consumer, notify=False)
            return
        if not consumer.closed:
            await sender.send(send_parameters(rtp, ssrc=sender._ssrc))

    async def _on_produce_data(self, peer: Peer, data: dict[str, Any]) -> Any:
        transport = self._transport(peer, data)
        stream = data.get("sctpStreamParameters")
        if transport.sctp is None or not isinstance(stream, dict):
            raise Reject(400, "no SCTP on this transport or no sctpStreamParameters")
        try:
            stream_id = int(stream["streamId"])
        except (KeyError, TypeError, ValueError):
            raise Reject(400, "sctpStreamParameters.streamId required") from None
        label = str(data.get("label") or "")
        protocol = str(data.get("protocol") or "")
        channel = RTCDataChannel(
            transport.sctp,
            RTCDataChannelParameters(
                label=label,
                ordered=bool(stream.get("ordered", True)),
                maxRetransmits=stream.get("maxRetransmits"),
                maxPacketLifeTime=stream.get("maxPacketLifeTime"),
                protocol=protocol,
                negotiated=True,
                id=stream_id,
            ),
        )
        producer = DataProducer(
            id=str(uuid.uuid4()),
            peer=peer,
            label=label,
            protocol=protocol,
            stream=stream,
            app_data=data.get("appData"),
            channel=channel,
        )

        @channel.on("message")
        def on_message(message: bytes | str) -> None:
            self._data.setdefault(peer.room_id, []).append(
                DataMessage(
                    arrival=now(),
                    room_id=peer.room_id,
                    from_peer=peer.peer_id,
                    label=label,
                    payload=message,
                )
            )
            for consumer in list(producer.consumers.values()):
                consumer.deliver(message)

        peer.data_producers[producer.id] = producer
        peer.record.data_producers[producer.id] = label

        async def after() -> None:
            for other in self._rooms.get(peer.room_id, {}).values():
                if other is not peer and other.joined:
                    self._spawn(other.tasks, self._consume_data(other, producer))

        return {"id": producer.id}, after

    async def _consume_data(self, peer: Peer, producer: DataProducer) -> None:
        transport = peer.recv_transport
        if transport is None or transport.sctp is None or peer.closed:
            return
        if peer.peer_id in producer.consumers:
            return
        stream_id = transport.next_stream_id()
        stream: dict[str, Any] = {
            "streamId": stream_id,
            "ordered": bool(producer.stream.get("ordered", True)),
        }
        for key in ("maxRetransmits", "maxPacketLifeTime"):
            if producer.stream.get(key) is not None:
                stream[key] = producer.stream[key]
        channel = RTCDataChannel(
            transport.sctp,
            RTCDataChannelParameters(
                label=producer.label,
                ordered=stream["ordered"],
                maxRetransmits=stream.get("maxRetransmits"),
                maxPacketLifeTime=stream.get("maxPacketLifeTime"),
                protocol=producer.protocol,
                negotiated=True,
                id=stream_id,
            ),
        )
        consumer = DataConsumer(id=str(uuid.uuid4()), peer=peer, channel=channel)
        channel.on("open", consumer.flush)
        producer.consumers[peer.peer_id] = consumer
        try:
            await self._request(
                peer,
                "newDataConsumer",
                {
                    "peerId": producer.peer.peer_id,
                    "dataProducerId": producer.id,
                    "id": consumer.id,
                    "sctpStreamParameters": stream,
                    "label": producer.label,
                    "protocol": producer.protocol,
                    "appData": producer.app_data,
                },
            )
        except Exception as exc:
            logger.info("peer %s did not take data consumer: %r", peer.peer_id, exc)
            producer.consumers.pop(peer.peer_id, None)
            return
        consumer.accepted = True
        consumer.flush()

    async def _on_ok(self, peer: Peer, data: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def _on_pubsub_subscribe(self, peer: Peer, data: dict[str, Any]) -> dict[str, Any]:
        return {"messages": []}

    async def _on_remove_peer(self, peer: Peer, data: dict[str, Any]) -> dict[str, Any]:
        target = str(data.get("peerId"))
        if target in self._rooms.get(peer.room_id, {}):
            self._spawn(self._tasks, self.kick(peer.room_id, target, abrupt=False))
        return {}

    _handlers: dict[str, Callable[..., Awaitable[Any]]] = {
        "getRouterRtpCapabilities": _on_get_router_rtp_capabilities,
        "createWebRtcTransport": _on_create_transport,
        "connectWebRtcTransport": _on_connect_transport,
        "requestEntry": _on_request_entry,
        "join": _on_join,
        "produce": _on_produce,
        "produceData": _on_produce_data,
        "closeProducer": _on_close_producer,
        "resumeConsumer": _on_ok,
        "getTransportStats": _on_ok,
        "pubsubSubscribe": _on_pubsub_subscribe,
        "removePeer": _on_remove_peer,
    }

    # -- leaving -----------------------------------------------------------------------------------

    async def _peer_gone(self, peer: Peer) -> None:
        """The websocket closed (leave, crash, kick): tear the peer down, tell the others."""
        if peer.closed:
            return
        was_joined = peer.record.joined
        peer.closed = True
        peer.record.left_at = now()
        peer.record.ws_closed = True
        room = self._rooms.get(peer.room_id, {})
        if room.get(peer.peer_id) is peer:
            del room[peer.peer_id]
        for fut in peer.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("peer gone"))
        peer.pending.clear()
        for task in list(peer.tasks):
            if task is not asyncio.current_task():
                task.cancel()

        for consumer in list(peer.consumers.values()):
            await self._close_consumer(consumer, notify=False)
        for producer in list(peer.producers.values()):
            await self._close_producer(producer)
        peer.producers.clear()
        for other in list(room.values()):
            for data_producer in other.data_producers.values():
                data_producer.consumers.pop(peer.peer_id, None)
        for data_producer in peer.data_producers.values():
            for consumer in list(data_producer.consumers.values()):
                await self._notify(
                    consumer.peer, "dataConsumerClosed", {"dataConsumerId": consumer.id}
                )
            data_producer.consumers.clear()
        if was_joined:
            for other in list(room.values()):
                if other.joined:
                    await self._notify(other, "peerClosed", {"peerId": peer.peer_id})
        for transport in list(peer.transports.values()):
            await transport.close()
        if not peer.ws.closed:
            with contextlib.suppress(Exception):
                await peer.ws.close()
