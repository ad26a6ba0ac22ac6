"""The dispatcher's settings, from flags, environment and a TOML file.

Every setting is declared once in :data:`OPTIONS`; the command line, the
environment variable and the TOML key are derived from that declaration, so
``avatar-server serve --help`` lists all of them.  Precedence, highest first::

    command-line flag  >  environment variable  >  TOML file  >  default

The TOML file (``--config`` or ``AVATAR_SERVER_CONFIG``) groups the keys in
three tables, for example::

    [server]
    host = "0.0.0.0"
    max_sessions = 2

    [auth]
    videosdk_api_key = "..."      # or VIDEOSDK_API_KEY
    videosdk_secret_key = "..."   # or VIDEOSDK_SECRET_KEY
    token = "..."                 # or AVATAR_SERVER_TOKEN

    [renderer]
    renderer = "lipsync"
    weights = "/models/wav2lip.onnx"
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..synchronizer import DEFAULT_JITTER_FRAMES
from ..types import AvatarSettings


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and says why."""


@dataclass
class DispatcherConfig:
    # [server]
    host: str = "127.0.0.1"
    port: int = 8089
    join_path: str = "/launch"
    max_sessions: int = 4
    transport: str = "videosdk"
    duplicate_room: str = "replace"
    join_timeout: float = 20.0
    idle_timeout: float = 300.0
    leave_timeout: float = 5.0
    max_body_bytes: int = 16_384
    retry_after: int = 5
    prewarm: int = 1
    signaling_hosts: list[str] = field(default_factory=lambda: ["*.videosdk.live"])
    signaling_base_url: str | None = None
    ice_addresses: list[str] = field(default_factory=list)
    log_level: str = "info"
    # [auth]
    api_key: str | None = None
    secret: str | None = None
    token: str | None = None
    insecure: bool = False
    # [renderer]
    renderer: str = "lipsync"
    weights: str = "builtin"
    avatar: str | None = None
    backend: str = "auto"
    device: str = "auto"
    width: int = 512
    height: int = 512
    fps: float = 25.0
    max_batch: int = 8
    jitter_frames: int = DEFAULT_JITTER_FRAMES
    in_process: bool = False

    @property
    def settings(self) -> AvatarSettings:
        return AvatarSettings(video_width=self.width, video_height=self.height, video_fps=self.fps)

    @property
    def can_verify_tokens(self) -> bool:
        return bool(self.api_key and self.secret)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for settings that cannot work together."""
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"port must be 0-65535, got {self.port}")
        if not self.join_path.startswith("/"):
            raise ConfigError(f"join_path must start with '/', got {self.join_path!r}")
        if self.max_sessions < 0:
            raise ConfigError("max_sessions must be 0 or more")
        if self.transport not in ("videosdk", "local"):
            raise ConfigError(f"transport must be 'videosdk' or 'local', got {self.transport!r}")
        if self.duplicate_room not in ("replace", "refuse"):
            raise ConfigError(
                f"duplicate_room must be 'replace' or 'refuse', got {self.duplicate_room!r}"
            )
        if self.renderer not in ("lipsync", "pattern"):
            raise ConfigError(f"renderer must be 'lipsync' or 'pattern', got {self.renderer!r}")
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ConfigError(
                f"width and height must be even and positive: {self.width}x{self.height}"
            )
        if not (1 <= self.fps <= 60):
            raise ConfigError(f"fps must be between 1 and 60, got {self.fps}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"log_level must be debug, info, warning or error, got {self.log_level!r}"
            )
        for name in ("join_timeout", "idle_timeout", "leave_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for address in self.ice_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(f"ice_addresses: {address!r} is not an IP address") from None
        if self.signaling_base_url:
            name = self.signaling_base_url.split(":")[0].lower()
            if not any(fnmatch.fnmatch(name, p.lower()) for p in self.signaling_hosts):
                raise ConfigError(
                    f"signaling_base_url {self.signaling_base_url!r} does not match "
                    f"signaling_hosts ({', '.join(self.signaling_hosts)})"
                )
        if bool(self.api_key) != bool(self.secret):
            raise ConfigError(
                "set both the VideoSDK API key and secret (VIDEOSDK_API_KEY and "
                "VIDEOSDK_SECRET_KEY) or neither"
            )
        if not (self.can_verify_tokens or self.token or self.insecure):
            raise ConfigError(
                "refusing to start without a way to authenticate joins: set VIDEOSDK_API_KEY "
                "and VIDEOSDK_SECRET_KEY (verifies the agent's join token), or "
                "AVATAR_SERVER_TOKEN (a bearer token), or pass --insecure to accept "
                "unauthenticated requests on a loopback address"
            )
        if self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"--insecure only binds to a loopback address (127.0.0.1, ::1, localhost); "
                f"got host {self.host!r}"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Option:
    """One setting: its field, TOML table, environment variable and help text."""

    name: str
    section: str
    help: str
    env: str | None = None
    toml_key: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def env_var(self) -> str:
        return self.env or f"AVATAR_SERVER_{self.name.upper()}"

    @property
    def key(self) -> str:
        return self.toml_key or self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("host", "server", "address to bind (default 127.0.0.1)"),
    Option("port", "server", "port to bind; 0 picks a free one (default 8089)"),
    Option("join_path", "server", "path of the join endpoint (default /launch)"),
    Option("max_sessions", "server", "rooms served at once (default 4)"),
    Option(
        "transport",
        "server",
        "videosdk: join real VideoSDK rooms; local: a WebRTC peer on 127.0.0.1 offers "
        "through POST /local/{room}/offer (tests, demos) (default videosdk)",
        choices=("videosdk", "local"),
    ),
    Option(
        "duplicate_room",
        "server",
        "a join for a room that already has a session: 'replace' ends the old session and "
        "starts a new one, 'refuse' answers 409 (default replace)",
        choices=("replace", "refuse"),
    ),
    Option("join_timeout", "server", "seconds a room join may take (default 20)"),
    Option(
        "idle_timeout",
        "server",
        "leave after this many seconds without a message from the agent (default 300)",
    ),
    Option("leave_timeout", "server", "seconds a session gets to leave before it is killed"),
    Option("max_body_bytes", "server", "largest join body accepted (default 16384)"),
    Option("retry_after", "server", "Retry-After seconds sent with 503 answers (default 5)"),
    Option("prewarm", "server", "session processes kept started and idle (0 or 1, default 1)"),
    Option(
        "signaling_hosts",
        "server",
        "comma-separated host patterns a join's signaling_base_url may name "
        "(default *.videosdk.live)",
    ),
    Option(
        "signaling_base_url",
        "server",
        "VideoSDK host for joins that name none (videosdk-agents' AvatarAudioOut never "
        "does); must match signaling_hosts (default: the SDK's, api.videosdk.live)",
    ),
    Option(
        "ice_addresses",
        "server",
        "comma-separated local addresses WebRTC gathers host candidates on (default: every "
        "interface but loopback; 127.0.0.1 keeps media on this host, for tests)",
    ),
    Option("log_level", "server", "debug, info, warning or error (default info)"),
    Option(
        "api_key", "auth", "VideoSDK API key", env="VIDEOSDK_API_KEY", toml_key="videosdk_api_key"
    ),
    Option(
        "secret",
        "auth",
        "VideoSDK secret: join tokens must be signed with it",
        env="VIDEOSDK_SECRET_KEY",
        toml_key="videosdk_secret_key",
    ),
    Option(
        "token",
        "auth",
        "bearer token for the admin endpoints (and accepted for joins)",
        env="AVATAR_SERVER_TOKEN",
    ),
    Option(
        "insecure",
        "auth",
        "accept unauthenticated requests; only allowed on a loopback host",
    ),
    Option(
        "renderer",
        "renderer",
        "lipsync: the model; pattern: a deterministic test pattern (default lipsync)",
        choices=("lipsync", "pattern"),
    ),
    Option(
        "weights",
        "renderer",
        "'builtin', 'reference' or a Wav2Lip-compatible ONNX file (default builtin)",
    ),
    Option("avatar", "renderer", "avatar directory made by 'prepare' (default: built-in)"),
    Option("backend", "renderer", "auto, onnx or torch", choices=("auto", "onnx", "torch")),
    Option("device", "renderer", "auto, cpu or cuda", choices=("auto", "cpu", "cuda")),
    Option("width", "renderer", "video width (default 512)"),
    Option("height", "renderer", "video height (default 512)"),
    Option("fps", "renderer", "video frame rate (default 25)"),
    Option("max_batch", "renderer", "largest inference batch across sessions (default 8)"),
    Option(
        "jitter_frames",
        "renderer",
        f"frames queued before playout starts (default {DEFAULT_JITTER_FRAMES})",
    ),
    Option(
        "in_process",
        "renderer",
        "render inside each session process instead of the shared renderer process (debugging)",
    ),
)

_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off", ""}


def _field_types() -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(DispatcherConfig)}


def _convert(option: Option, value: Any, source: str) -> Any:
    """Turn a TOML or environment value into the field's type, or explain why not."""
    kind = _field_types()[option.name]
    where = f"{option.name} (from {source})"
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _BOOL_TRUE:
                return True
            if text in _BOOL_FALSE:
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if kind == "list[str]":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"expected a list of strings, got {value!r}")
            return [i.strip() for i in items if i.strip()]
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        if option.choices and value not in option.choices:
            raise ValueError(f"expected one of {', '.join(option.choices)}, got {value!r}")
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML file, keyed by field name."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    by_key = {(o.section, o.key): o for o in OPTIONS}
    values: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict) or section not in {"server", "auth", "renderer"}:
            raise ConfigError(
                f"{path}: unknown table [{section}]; use [server], [auth] and [renderer]"
            )
        for key, value in table.items():
            option = by_key.get((section, key))
            if option is None:
                raise ConfigError(f"{path}: unknown setting {key!r} in [{section}]")
            values[option.name] = _convert(option, value, f"{path} [{section}]")
    return values


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    return {
        o.name: _convert(o, environ[o.env_var], o.env_var) for o in OPTIONS if o.env_var in environ
    }


def build_parser(prog: str = "avatar-server serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the Avatar Server's HTTP dispatcher: agents POST a join request, "
        "the dispatcher starts a session process that joins the room and publishes the "
        "avatar's audio and video. Settings come from flags, then environment variables, "
        "then the TOML file, then defaults.",
        epilog="Endpoints: POST <join_path>, GET /healthz, GET /readyz, GET /metrics, "
        "GET /sessions, DELETE /sessions/{id}, POST /weights (admin endpoints need "
        "'Authorization: Bearer <token>').",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings file with [server], [auth] and [renderer] tables "
        "(env AVATAR_SERVER_CONFIG)",
    )
    kinds = _field_types()
    for option in OPTIONS:
        help_text = f"{option.help} [env {option.env_var}; TOML [{option.section}] {option.key}]"
        if kinds[option.name] == "bool":
            parser.add_argument(
                option.flag,
                dest=option.name,
                action="store_const",
                const=True,
                default=None,
                help=help_text,
            )
            continue
        parser.add_argument(
            option.flag,
            dest=option.name,
            default=None,
            metavar=None if option.choices else option.name.upper(),
            choices=option.choices,
            type=_FLAG_TYPES.get(kinds[option.name], str),
            help=help_text,
        )
    return parser


def _split_list(text: str) -> list[str]:
    return [i.strip() for i in text.split(",") if i.strip()]


_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "list[str]": _split_list,
}


def load_config(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> DispatcherConfig:
    """Parse flags, read the environment and the TOML file, validate.

    Raises :class:`ConfigError`; argparse exits on malformed flags.
    """
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    config_path = args.config or environ.get("AVATAR_SERVER_CONFIG")
    if config_path:
        values.update(read_toml(config_path))
    values.update(read_env(environ))
    values.update(
        {o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name) is not None}
    )
    config = DispatcherConfig(**values)
    config.validate()
    return config
