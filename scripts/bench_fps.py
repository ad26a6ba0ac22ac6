#!/usr/bin/env python
"""How many avatar sessions does this machine serve, and how well?

    python scripts/bench_fps.py [--device auto|cpu|cuda] [--backend auto|onnx|torch]
        [--weights FILE.onnx|builtin|reference] [--batch 1,2,4,8] [--sessions N|auto]
        [--duration S] [--json OUT.json] [--plot OUT.png]

Sections, in the order they run (each a module of ``scripts/bench``):

    env           the machine and the library versions
    model         the model alone: fps and ms per frame per backend, device, batch
    stages        per-frame time of features, inference, composition, colour, ring copy
    ipc           frame ring vs multiprocessing.Queue: latency and CPU per frame
    pacing        a session with a jittery renderer: this design vs the reference design
    jitter_sweep  stalls vs first-frame latency for several jitter buffer depths
    sessions      the most concurrent sessions that hold the target fps with no stall
    latency       first audio byte -> first lip-synced frame; interrupt -> silence

Progress goes to stderr; the summary table to stdout at the end; ``--json``
writes every figure (schema: README, "Performance").  A section that cannot run
here (no GPU, a package missing) is reported as ``skipped: <reason>``.
Exit status: 0 when every section ran or was skipped, 1 when one failed,
2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: make ``scripts.bench`` importable (here and in
    sys.path.insert(0, str(ROOT))  # the renderer processes, which inherit sys.path)

from scripts.bench import (  # noqa: E402
    env,
    ipc,
    latency,
    model,
    pacing,
    sessions,
    stages,
)
from scripts.bench.common import BenchConfig, Progress, Skip, skipped  # noqa: E402
from scripts.bench.report import summary  # noqa: E402

SECTIONS = {
    "env": env.run,
    "model": model.run,
    "stages": stages.run,
    "ipc": ipc.run,
    "pacing": pacing.run,
    "jitter_sweep": pacing.run_sweep,
    "sessions": sessions.run,
    "latency": latency.run,
}


def _int_list(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be at least 1, got {text!r}")
    return values


def _sessions(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sessions takes a number or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError("--sessions must be at least 1")
    return value


def _section_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="bench_fps.py",
        description="How many avatar sessions this machine serves (see the README, 'Performance').",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument(
        "--backend",
        choices=["auto", "onnx", "torch"],
        default=d.backend,
        help="auto: every backend installed (model section), the server's choice (others)",
    )
    p.add_argument(
        "--weights",
        default=d.weights,
        help="'builtin', 'reference' (the real-size Wav2Lip network) or an ONNX file",
    )
    p.add_argument(
        "--batch",
        type=_int_list,
        default=d.batches,
        metavar="1,2,4,8",
        help="batch sizes for the model section; the largest is the renderer's batch",
    )
    p.add_argument(
        "--sessions",
        type=_sessions,
        default=d.sessions,
        metavar="N|auto",
        help="auto: search up to %(default)s; N: search up to N sessions",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=d.duration,
        metavar="S",
        help="seconds of speech per pacing, sweep and sessions run (default %(default)s)",
    )
    p.add_argument(
        "--tts-speed",
        type=float,
        default=d.tts_speed,
        metavar="X",
        help="pacing and sweep: the agent streams speech X times faster than real time "
        "(default 1: live TTS, the hardest case; 0: all at once)",
    )
    p.add_argument(
        "--jitter-frames",
        type=int,
        default=d.jitter_frames,
        metavar="N",
        help="the synchronizer's jitter buffer for pacing, sessions and latency",
    )
    p.add_argument(
        "--jitter-sweep",
        type=_int_list,
        default=d.jitter_sweep,
        metavar="1,2,3|none",
        help="jitter buffer depths to compare (default 1,2,3,4,6)",
    )
    p.add_argument(
        "--ipc-frames",
        type=int,
        default=d.ipc_frames,
        metavar="N",
        help="frames per transport and resolution in the ipc section",
    )
    p.add_argument("--fps", type=float, default=d.fps, help="target frame rate (default 25)")
    p.add_argument(
        "--sections",
        type=_section_list,
        default=list(SECTIONS),
        metavar="a,b",
        help="run only these sections (env always runs): " + ",".join(SECTIONS),
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--in-process",
        action="store_true",
        help="render in this process instead of a renderer process (debugging)",
    )
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write every figure as JSON")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="OUT.png",
        help="write frame intervals (pacing) and fps vs batch (model) as a PNG",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def config_from(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        device=args.device,
        backend=args.backend,
        weights=args.weights,
        batches=args.batch or [1],
        sessions=args.sessions,
        duration=args.duration,
        tts_speed=args.tts_speed,
        fps=args.fps,
        jitter_frames=args.jitter_frames,
        jitter_sweep=args.jitter_sweep,
        ipc_frames=args.ipc_frames,
        seed=args.seed,
        in_process=args.in_process,
    )


def check_config(config: BenchConfig) -> str | None:
    """What is wrong with the arguments, in words, or None."""
    if config.duration <= 0:
        return "--duration must be positive"
    if config.tts_speed < 0:
        return "--tts-speed must be 0 (all at once) or positive"
    if config.fps <= 0:
        return "--fps must be positive"
    if config.jitter_frames < 1:
        return "--jitter-frames must be at least 1"
    if config.ipc_frames < 10:
        return "--ipc-frames must be at least 10"
    if config.device == "cuda":
        from scripts.bench.common import resolve_device

        if resolve_device("auto") != "cuda":
            return "--device cuda: no CUDA GPU is usable here (a CPU build of torch, or no driver)"
    return None


def run_sections(
    config: BenchConfig, names: list[str], progress: Progress
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(results, plot data, failed sections); every section of SECTIONS gets an entry."""
    results: dict[str, Any] = {}
    artifacts: dict[str, Any] = {}
    failed = []
    for name, section in SECTIONS.items():
        if name not in names and name != "env":  # env describes every figure: always run
            results[name] = skipped("not selected (--sections)")
            continue
        if name == "jitter_sweep" and not config.jitter_sweep:
            results[name] = skipped("no depths given (--jitter-sweep none)")
            continue
        try:
            results[name] = section(config, progress, artifacts)
        except (Skip, ImportError) as exc:
            results[name] = skipped(str(exc))
            progress(name, f"skipped: {exc}")
        except Exception as exc:
            traceback.print_exc()
            results[name] = skipped(f"failed: {type(exc).__name__}: {exc}")
            failed.append(name)
    return results, artifacts, failed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from(args)
    problem = check_config(config)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    progress = Progress(quiet=args.quiet)
    results, artifacts, failed = run_sections(config, args.sections, progress)
    results["config"] = dataclasses.asdict(config)
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        progress("done", f"wrote {args.json}")
    if args.plot:
        from scripts.bench.plot import write_plot

        write_plot(args.plot, results, artifacts)
        progress("done", f"wrote {args.plot}")
    if failed:
        print(f"\nfailed sections: {', '.join(failed)} (see the errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
