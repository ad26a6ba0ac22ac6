"""``avatar-server``: the command line.

A user error (an unreadable audio file, a bad weights file, a missing avatar,
an output path that cannot be written) is one line on stderr and exit code 2,
found before any process starts where it can be; ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from .loop import run as run_loop
from .render_job import SAMPLE_SPEECH, RenderError, check_output, read_audio, render
from .synchronizer import DEFAULT_JITTER_FRAMES
from .types import AvatarSettings

logger = logging.getLogger("avatar-server")


def _error(args: argparse.Namespace, exc: BaseException, code: int = 2) -> int:
    """One clear line on stderr (the traceback too with ``-v``); the exit code."""
    if args.verbose:
        traceback.print_exception(exc)
    print(f"error: {exc}", file=sys.stderr)
    return code


def _check_renderer_inputs(args: argparse.Namespace) -> None:
    """The weights file and the avatar directory, checked before a renderer process starts."""
    if args.avatar is not None:
        avatar = Path(args.avatar).expanduser()
        if not avatar.is_dir():
            raise RenderError(
                f"avatar directory not found: {avatar} (make one with 'avatar-server prepare')"
            )
        if not (avatar / "avatar.json").is_file():
            raise RenderError(
                f"{avatar} is not an avatar directory (no avatar.json): "
                "make one with 'avatar-server prepare'"
            )
    if args.renderer == "lipsync" and args.weights not in ("builtin", "reference"):
        from models.weights import resolve_weights
        from renderers.validation import read_binding

        try:
            read_binding(resolve_weights(args.weights))
        except (FileNotFoundError, ValueError) as exc:  # validation's WeightsError is one
            raise RenderError(str(exc)) from exc


def _render_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from renderers.supervisor import RendererStartError, RendererUnavailable

    from .renderer_factory import RendererSpec, open_renderer

    audio_path = Path(args.audio) if args.audio else SAMPLE_SPEECH
    try:
        audio = read_audio(audio_path)
        out = check_output(args.out)
        _check_renderer_inputs(args)
    except RenderError as exc:
        return _error(args, exc)
    settings = AvatarSettings(video_width=args.width, video_height=args.height, video_fps=args.fps)
    spec = RendererSpec(
        kind=args.renderer,
        weights=args.weights,
        avatar=args.avatar,
        backend=args.backend,
        device=args.device,
        in_process=args.in_process,
        settings=settings,
    )
    total = len(audio) / settings.audio_sample_rate
    bar = tqdm(
        total=round(total, 1),
        unit="s",
        desc="render",
        disable=args.quiet,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]",
    )

    def progress(seconds: float) -> None:
        bar.n = round(min(seconds, total), 1)
        bar.refresh()

    async def run():
        async with open_renderer(spec) as renderer:
            return await render(
                audio,
                out,
                renderer,
                settings=settings,
                speed=args.speed,
                jitter_frames=args.jitter_frames,
                progress=progress,
            )

    try:
        report = run_loop(run())
    except (RenderError, ValueError, FileNotFoundError) as exc:
        bar.close()
        return _error(args, exc)
    except (RendererStartError, RendererUnavailable) as exc:  # not the user's doing
        bar.close()
        return _error(args, exc, 1)
    bar.close()
    print(
        f"wrote {report.out}: {report.output_seconds:.2f} s of audio "
        f"(input {report.input_seconds:.2f} s), {report.video_frames} frames at "
        f"{report.fps:g} fps, {report.stalls} stalls"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avatar-server",
        description="Self-hosted lip-sync avatar server for VideoSDK AI agents.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "render",
        help="run a local session on an audio file and write the result to an MP4",
        description="Send an audio file through a local session (agent -> room -> avatar "
        "session -> renderer process -> tracks) and write what the room would receive "
        "to an MP4 (H.264 + AAC).",
    )
    r.add_argument("--audio", help="input audio file (default: the bundled speech sample)")
    r.add_argument("--out", required=True, help="output MP4 path")
    r.add_argument("--avatar", help="avatar directory made by 'prepare' (default: built-in)")
    r.add_argument(
        "--weights",
        default="builtin",
        help="'builtin', 'reference' or a Wav2Lip-compatible ONNX file (default: builtin)",
    )
    r.add_argument(
        "--renderer",
        choices=["lipsync", "pattern"],
        default="lipsync",
        help="lipsync: the model; pattern: a deterministic test pattern",
    )
    r.add_argument("--backend", choices=["auto", "onnx", "torch"], default="auto")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    r.add_argument("--fps", type=float, default=25.0, help="video frame rate (default 25)")
    r.add_argument("--width", type=int, default=512)
    r.add_argument("--height", type=int, default=512)
    r.add_argument(
        "--jitter-frames",
        type=int,
        default=DEFAULT_JITTER_FRAMES,
        help=f"frames queued before playout starts (default {DEFAULT_JITTER_FRAMES})",
    )
    r.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="clock speed: >1 renders faster than real time if the renderer keeps up",
    )
    r.add_argument(
        "--in-process",
        action="store_true",
        help="render in this process instead of a renderer process (debugging)",
    )
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_render_command)
    for name, (_, help_text) in PASSTHROUGH.items():
        sub.add_parser(
            name, help=f"{help_text} (see 'avatar-server {name} --help')", add_help=False
        )
    return parser


# Subcommands with their own parsers, imported only when used (the session
# process must start fast and never import the renderer side).
PASSTHROUGH = {
    "prepare": (
        "renderers.prepare:main",
        "make an avatar directory from a portrait image or video",
    ),
    "serve": ("worker.dispatcher.app:serve_main", "run the dispatcher (HTTP join endpoint)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        from .renderer_factory import load_factory

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        return load_factory(PASSTHROUGH[argv[0]][0])(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
