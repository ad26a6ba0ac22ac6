"""HTTPS ``/infra/v1/meetings/server-init-config``, served from a thread.

The SDK fetches it with a blocking ``requests.post`` on its event loop, so an
in-process client would otherwise wait for a loop it is itself blocking.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from Crypto.Cipher import AES
from Crypto.Util.Padding import pad

logger = logging.getLogger(__name__)

# The SDK's own key and IV (videosdk/utils.py): iceServers travel AES-CBC encrypted.
_ICE_KEY = b"YSJ!gMW!Y1Eu8j1NTb^rZyQiNLplYz*n"[:32]
_ICE_IV = b"y^LKkEGk0FwxjQ#B"[:16]
INIT_CONFIG_PATH = "/infra/v1/meetings/server-init-config"


def encrypt_ice_servers(servers: list[Any]) -> str:
    """What ``videosdk.utils.aes_decrypt`` turns back into ``servers`` ("" would not parse)."""
    cipher = AES.new(_ICE_KEY, AES.MODE_CBC, _ICE_IV)
    raw = pad(json.dumps(servers).encode(), AES.block_size, style="pkcs7")
    return base64.b64encode(cipher.encrypt(raw)).decode()


class _ConfigHandler(BaseHTTPRequestHandler):
    server: ConfigServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            room_id = json.loads(body or b"{}").get("roomId")
        except (ValueError, AttributeError):
            room_id = None
        self.server.requests.append(
            {
                "path": self.path,
                "roomId": room_id,
                "authorization": self.headers.get("Authorization"),
            }
        )
        if not self.path.startswith(INIT_CONFIG_PATH):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = json.dumps({"data": self.server.answer()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = _answer
    do_GET = _answer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("init-config: " + format, *args)


class ConfigServer(ThreadingHTTPServer):
    """HTTPS on 127.0.0.1:<free port>; ``answer()`` gives the response's ``data``."""

    daemon_threads = True

    def __init__(
        self,
        context: ssl.SSLContext,
        answer: Callable[[], dict[str, Any]],
        requests: list[dict[str, Any]],
    ) -> None:
        super().__init__(("127.0.0.1", 0), _ConfigHandler)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.answer = answer
        self.requests = requests  # path, roomId, authorization of every request
        self._thread = threading.Thread(
            target=self.serve_forever, name="loopback-room-init-config", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
