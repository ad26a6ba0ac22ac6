"""Who may start an avatar, and who may administer the dispatcher.

A join is accepted when **either**

* its ``token`` is a VideoSDK join token signed with the configured secret,
  for the configured API key, unexpired, naming the body's
  ``participant_id`` (:func:`worker.auth.verify_join_token`).  This is what
  an unmodified videosdk-agents ``AvatarAudioOut`` sends; or
* the request carries ``Authorization: Bearer <AVATAR_SERVER_TOKEN>``.

Admin endpoints need the bearer token.  ``--insecure`` (loopback only)
accepts everything.
"""

from __future__ import annotations

import hmac
import uuid

import jwt

from ..auth import AuthError, verify_join_token
from .config import DispatcherConfig

__all__ = ["AuthError", "Authenticator"]


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class Authenticator:
    def __init__(self, config: DispatcherConfig) -> None:
        self.api_key = config.api_key
        self.secret = config.secret
        self.token = config.token
        self.insecure = config.insecure

    def _bearer_ok(self, header: str | None) -> bool:
        given = bearer(header)
        return bool(
            self.token and given and hmac.compare_digest(given.encode(), self.token.encode())
        )

    def join(self, authorization: str | None, token: str | None, participant_id: str | None) -> str:
        """Check a join; return the avatar's participant id or raise :class:`AuthError`."""
        reasons = []
        if self.api_key and self.secret and not token:
            reasons.append("the request carries no token")
        elif self.api_key and self.secret:
            try:
                claims = verify_join_token(
                    token, api_key=self.api_key, secret=self.secret, participant_id=participant_id
                )
                return participant_id or str(claims["participantId"])
            except AuthError as exc:
                reasons.append(str(exc))
        if self._bearer_ok(authorization) or self.insecure:
            return participant_id or _unverified_participant(token)
        if authorization and self.token:
            reasons.append("the bearer token does not match")
        elif not reasons:
            reasons.append("a bearer token is required (Authorization: Bearer ...)")
        raise AuthError("; ".join(reasons))

    def admin(self, authorization: str | None) -> None:
        if self.insecure or self._bearer_ok(authorization):
            return
        if not self.token:
            raise AuthError(
                "admin endpoints need a bearer token; start the server with AVATAR_SERVER_TOKEN set"
            )
        if bearer(authorization) is None:
            raise AuthError("missing 'Authorization: Bearer <token>' header")
        raise AuthError("the bearer token does not match")


def _unverified_participant(token: str | None) -> str:
    """The token's ``participantId`` when a bearer token vouched for the request."""
    try:
        claims = jwt.decode(token or "", options={"verify_signature": False})
        pid = claims.get("participantId")
        if isinstance(pid, str) and pid:
            return pid
    except jwt.PyJWTError:
        pass
    return f"avatar_{uuid.uuid4().hex[:8]}"
