"""Credentials an agent hands to the Avatar Server, and their verification.

The agent signs a VideoSDK token for the avatar participant with its API
secret (:func:`generate_avatar_credentials`) and posts it in an
:class:`AvatarJoinInfo`.  A dispatcher that holds the same key verifies it
(:func:`verify_join_token`), so no change to the agent is needed.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

LINKED_AGENT_ID = "videosdk.linked_agent_id"


@dataclass(frozen=True)
class AvatarAuthCredentials:
    """Pre-signed credentials that allow an Avatar Server to join a VideoSDK room."""

    participant_id: str
    token: str
    attributes: dict[str, str] | None = None


@dataclass(frozen=True)
class AvatarJoinInfo:
    """The body ``AvatarAudioOut.connect()`` posts to the dispatcher."""

    room_name: str
    token: str
    participant_id: str | None = None
    signaling_base_url: str | None = None


def generate_avatar_credentials(
    api_key: str,
    secret: str,
    *,
    participant_id: str | None = None,
    ttl_seconds: int = 3600,
) -> AvatarAuthCredentials:
    """Sign an HS256 VideoSDK token that lets the avatar participant join."""
    pid = participant_id or f"avatar_{uuid.uuid4().hex[:8]}"
    now = int(time.time())
    payload = {
        "apikey": api_key,
        "permissions": ["allow_join"],
        "version": 2,
        "iat": now,
        "exp": now + ttl_seconds,
        "participantId": pid,
    }
    return AvatarAuthCredentials(participant_id=pid, token=jwt.encode(payload, secret, "HS256"))


class AuthError(Exception):
    """A join token that must be refused; the message says why in plain words."""


def verify_join_token(
    token: str, *, api_key: str, secret: str, participant_id: str | None, leeway: float = 5.0
) -> dict[str, Any]:
    """Check a join token: HS256 signature, ``apikey``, expiry and ``participantId``.

    Returns the claims; raises :class:`AuthError` naming the first failed check.
    """
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            leeway=leeway,
            options={"require": ["exp", "apikey", "participantId"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("token has expired") from exc
    except jwt.InvalidSignatureError as exc:
        raise AuthError("token signature does not verify with the configured secret") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token lacks the {exc.claim!r} claim") from exc
    except jwt.PyJWTError as exc:
        raise AuthError(f"token is not a valid HS256 JWT: {exc}") from exc
    if claims.get("apikey") != api_key:
        raise AuthError("token was issued for a different API key")
    if participant_id is not None and claims.get("participantId") != participant_id:
        raise AuthError("token's participantId does not match the request's participant_id")
    return claims
