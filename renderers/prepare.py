"""``avatar-server prepare``: turn a portrait image or a short video into an avatar directory.

    image or video --read--> frames (BGR, even size, at the avatar's fps)
        --face box--> given (x, y, w, h), or OpenCV's frontal-face Haar cascade
                      (largest face; per frame for videos, gaps filled, boxes smoothed)
        --framing--> Wav2Lip crop boxes (avatar.crop_box) and 96x96 crops
        --idle loop--> video: the frames played forwards then backwards (ping-pong);
                       still: a few seconds of synthetic motion drawn from the one image,
                       a slow breathing bob plus periodic blinks, periodic so it loops
        --> avatar directory (format in renderers.avatar)

The idle loop of a still is also the base of speech frames, so a talking
avatar keeps breathing and blinking.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from models.contract import FACE_SIZE

from .avatar import Avatar, AvatarError, Box, crop_box, crop_face, paste_mask, save_avatar

logger = logging.getLogger(__name__)

FaceBox = tuple[float, float, float, float]  # x, y, w, h
IDLE_SECONDS = 4.0  # one breath per loop
BLINK_TIMES = (0.9, 3.1)  # seconds into the loop
BOB = 0.004  # breathing amplitude as a fraction of the frame height
MAX_SIDE = 1280  # default limit on the long side of the avatar's frames
SMOOTH_FRAMES = 5  # moving-average window for per-frame face boxes of a video


def prepare(
    source: str | Path | np.ndarray,
    out_dir: str | Path,
    face_box: FaceBox | None = None,
    fps: float = 25.0,
    *,
    size: tuple[int, int] | None = None,
    idle_seconds: float = IDLE_SECONDS,
    max_seconds: float | None = None,
    progress: bool = True,
) -> Avatar:
    """Prepare an avatar from an image or video file (or a BGR array) and write it to ``out_dir``.

    ``face_box`` (in input pixels) skips detection; ``size=(width, height)``
    scales and centre-crops the input (default: the input's size, rounded down
    to even, long side at most ``MAX_SIDE``); ``max_seconds`` keeps only the
    start of a long video.
    """
    if fps <= 0:
        raise AvatarError(f"fps must be positive, got {fps}")
    frames, kind, name = _read(source, fps, max_seconds, progress)
    fit = Fit.plan(frames[0].shape[1], frames[0].shape[0], size)
    frames = [fit.image(f) for f in frames]
    face_box = fit.box(face_box) if face_box is not None else None
    if kind == "still":
        box = face_box if face_box is not None else detect_face(frames[0])
        avatar = avatar_from_still(frames[0], box, fps=fps, seconds=idle_seconds, source=name)
    else:
        avatar = avatar_from_video(
            frames, fps=fps, face_box=face_box, source=name, progress=progress
        )
    save_avatar(avatar, out_dir)
    return avatar


# ---------------------------------------------------------------- reading inputs


def _read(
    source: str | Path | np.ndarray, fps: float, max_seconds: float | None, progress: bool
) -> tuple[list[np.ndarray], str, str]:
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3:
            raise AvatarError(f"an image array must be [H, W, 3] BGR, got {source.shape}")
        return [np.ascontiguousarray(source, dtype=np.uint8)], "still", "array"
    path = Path(source)
    if not path.is_file():
        raise AvatarError(f"input not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is not None:
        return [image], "still", path.name
    frames = _read_video(path, fps, max_seconds, progress)
    if len(frames) == 1:
        return frames, "still", path.name
    return frames, "video", path.name


def _read_video(
    path: Path, fps: float, max_seconds: float | None, progress: bool
) -> list[np.ndarray]:
    """Decode a video, picking the frame shown at each tick of the avatar's ``fps``."""
    import av
    from tqdm import tqdm

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise AvatarError(f"cannot read {path} as an image or a video: {exc}") from exc
    with container:
        if not container.streams.video:
            raise AvatarError(f"{path} has no video stream (expected an image or a video)")
        stream = container.streams.video[0]
        duration = float(stream.duration * stream.time_base) if stream.duration else None
        if duration is None and container.duration:
            duration = container.duration / 1_000_000
        limit = min(duration or math.inf, max_seconds or math.inf)
        total = math.ceil(limit * fps) if math.isfinite(limit) else None
        frames: list[np.ndarray] = []
        start: float | None = None
        bar = tqdm(total=total, unit="frame", desc="decode", disable=not progress, leave=False)
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    t = len(frames) / fps
                else:
                    t = float(frame.pts * stream.time_base)
                    start = t if start is None else start
                    t -= start  # streams may start after 0 (edit lists, B-frame delay)
                if t >= limit:
                    break
                image = frame.to_ndarray(format="bgr24")
                # Each avatar tick shows the decoded frame nearest to it.
                while len(frames) / fps < t + 0.5 / fps and (total is None or len(frames) < total):
                    frames.append(image)
                    bar.update(1)
        except av.error.FFmpegError as exc:
            if not frames:
                raise AvatarError(f"cannot read {path} as an image or a video: {exc}") from exc
            logger.warning(
                "%s: decoding stopped early (%s); using %d frames", path, exc, len(frames)
            )
        finally:
            bar.close()
    if not frames:
        raise AvatarError(f"cannot read {path} as an image or a video: no frame decodes")
    return frames


@dataclass(frozen=True)
class Fit:
    """Input pixels -> avatar pixels: scale, then crop ``(ox, oy)`` off the scaled image."""

    width: int
    height: int
    scale: float
    ox: int
    oy: int

    @classmethod
    def plan(cls, w: int, h: int, size: tuple[int, int] | None) -> Fit:
        """Cover ``size`` and centre-crop it.

        Without ``size`` the shape is kept, with the long side at most ``MAX_SIDE``
        (every frame stays in memory) and even dimensions.
        """
        if size is None:
            shrink = min(1.0, MAX_SIDE / max(h, w))
            size = (int(w * shrink) // 2 * 2, int(h * shrink) // 2 * 2)
        width, height = size
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise AvatarError(f"avatar size must be even and positive, got {width}x{height}")
        if width <= w and height <= h and width >= w - 1 and height >= h - 1:
            return cls(width, height, 1.0, 0, 0)  # at most an odd row/column dropped
        scale = max(width / w, height / h)
        sw, sh = max(width, round(w * scale)), max(height, round(h * scale))
        return cls(width, height, scale, (sw - width) // 2, (sh - height) // 2)

    def image(self, image: np.ndarray) -> np.ndarray:
        if self.scale != 1.0:
            h, w = image.shape[:2]
            size = (max(self.width, round(w * self.scale)), max(self.height, round(h * self.scale)))
            interpolation = cv2.INTER_AREA if self.scale < 1 else cv2.INTER_LINEAR
            image = cv2.resize(image, size, interpolation=interpolation)
        crop = image[self.oy : self.oy + self.height, self.ox : self.ox + self.width]
        return np.ascontiguousarray(crop)

    def box(self, box: FaceBox) -> FaceBox:
        x, y, w, h = box
        s = self.scale
        return (x * s - self.ox, y * s - self.oy, w * s, h * s)


# ---------------------------------------------------------------- detection


def _cascade(name: str) -> cv2.CascadeClassifier:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
    if cascade.empty():
        raise AvatarError(f"OpenCV's {name} is missing; reinstall opencv-python-headless")
    return cascade


def find_faces(image: np.ndarray) -> list[FaceBox]:
    """All frontal faces OpenCV's Haar cascade finds, largest first."""
    gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    min_side = max(24, min(image.shape[:2]) // 10)
    found = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
    )
    boxes = [tuple(float(v) for v in b) for b in found]
    return sorted(boxes, key=lambda b: -b[2] * b[3])


def detect_face(image: np.ndarray) -> FaceBox:
    """The largest face, or :class:`AvatarError` explaining what to do instead."""
    faces = find_faces(image)
    if not faces:
        raise AvatarError(
            "no face found in the image: use a well-lit, frontal portrait, "
            "or give the face box yourself (--face-box X Y W H)"
        )
    return faces[0]


def find_eyes(image: np.ndarray, face: FaceBox) -> tuple[FaceBox, FaceBox]:
    """Eye boxes inside a face box: the eye cascade's two best, else the usual proportions."""
    x, y, w, h = face
    x0, y0 = max(0, int(x)), max(0, int(y + 0.15 * h))
    upper = image[y0 : int(y + 0.6 * h), x0 : int(x + w)]
    eyes: list[FaceBox] = []
    if upper.size:
        gray = cv2.equalizeHist(cv2.cvtColor(upper, cv2.COLOR_BGR2GRAY))
        found = _cascade("haarcascade_eye.xml").detectMultiScale(gray, 1.1, 5)
        left = [b for b in found if b[0] + b[2] / 2 < w / 2]
        right = [b for b in found if b[0] + b[2] / 2 >= w / 2]
        if left and right:
            for group in (left, right):
                ex, ey, ew, eh = max(group, key=lambda b: b[2] * b[3])
                # The cascade's box includes brow and cheek: keep its middle band.
                eyes.append((x0 + ex + 0.1 * ew, y0 + ey + 0.25 * eh, 0.8 * ew, 0.5 * eh))
    if len(eyes) == 2:
        return eyes[0], eyes[1]
    ew, eh = 0.2 * w, 0.1 * h
    return (
        (x + 0.3 * w - ew / 2, y + 0.4 * h - eh / 2, ew, eh),
        (x + 0.7 * w - ew / 2, y + 0.4 * h - eh / 2, ew, eh),
    )


# ---------------------------------------------------------------- stills


def blink_closure(t: float, loop_seconds: float) -> float:
    """How closed the eyes are at ``t`` seconds into the loop, 0-1 (60 ms down, 140 ms up)."""
    closure = 0.0
    for start in BLINK_TIMES:
        dt = (t - start * loop_seconds / IDLE_SECONDS) % loop_seconds
        if dt < 0.06:
            closure = max(closure, dt / 0.06)
        elif dt < 0.2:
            closure = max(closure, 1.0 - (dt - 0.06) / 0.14)
    return closure


def close_eyes(image: np.ndarray, eyes: Sequence[FaceBox], closure: float) -> np.ndarray:
    """Draw upper eyelids lowered by ``closure`` (0 open, 1 shut) over each eye box.

    The lid is the skin just above the eye, swept down over an ellipse inscribed
    in the box, with a darker lash line along its edge; edges are feathered.
    """
    if closure <= 0.02:
        return image
    out = image.astype(np.float32)
    for ex, ey, ew, eh in eyes:
        x0, y0 = max(0, int(ex)), max(0, int(ey))
        x1, y1 = min(image.shape[1], math.ceil(ex + ew)), min(image.shape[0], math.ceil(ey + eh))
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        patch = out[y0:y1, x0:x1]
        skin = np.median(out[max(0, y0 - 2) : y0 + 2, x0:x1].reshape(-1, 3), axis=0)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        cx, cy, ax, ay = ex + ew / 2, ey + eh / 2, ew / 2, eh / 2
        inside = 1.0 - ((xs - cx) / ax) ** 2 - ((ys - cy) / ay) ** 2
        lid_edge = cy - ay + 2 * ay * closure  # the lid's lower edge, straight across
        covered = np.clip((lid_edge - ys) / 1.5 + 0.5, 0.0, 1.0)
        alpha = np.clip(inside * 4.0, 0.0, 1.0) * covered
        lash = np.exp(-(((ys - lid_edge) / max(1.0, 0.06 * eh)) ** 2)) * np.clip(inside * 4, 0, 1)
        lid = patch + alpha[..., None] * (skin - patch)
        lid *= 1.0 - 0.55 * closure * lash[..., None]
        out[y0:y1, x0:x1] = lid
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def avatar_from_still(
    image: np.ndarray,
    face_box: FaceBox,
    *,
    fps: float = 25.0,
    seconds: float = IDLE_SECONDS,
    eyes: Sequence[FaceBox] | None = None,
    kind: str = "still",
    source: str = "",
) -> Avatar:
    """An avatar whose frames are a seamless loop of gentle motion drawn from one image."""
    h, w = image.shape[:2]
    _check_box(face_box, w, h)
    eyes = eyes if eyes is not None else find_eyes(image, face_box)
    n = max(2, round(seconds * fps))
    loop_seconds = n / fps
    box = crop_box(face_box, w, h)
    frames = np.empty((n, h, w, 3), np.uint8)
    crops = np.empty((n, FACE_SIZE, FACE_SIZE, 3), np.uint8)
    boxes = []
    for i in range(n):
        phase = 2 * math.pi * i / n
        # Breathing: the whole picture rises and swells a little about its bottom centre.
        dy = -BOB * h * (0.5 - 0.5 * math.cos(phase))
        scale = 1.0 + 0.002 * (0.5 - 0.5 * math.cos(phase))
        warp = np.array([[scale, 0, (1 - scale) * w / 2], [0, scale, (1 - scale) * h + dy]])
        still = close_eyes(image, eyes, blink_closure(i / fps, loop_seconds))
        cv2.warpAffine(
            still, warp, (w, h), frames[i], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        bx0, by0 = box[0] * scale + warp[0, 2], box[1] * scale + warp[1, 2]
        boxes.append(_box_like(box, bx0, by0, w, h))
        crops[i] = crop_face(frames[i], boxes[-1])
    mask = paste_mask().copy()
    return Avatar(frames, crops, np.array(boxes), mask, np.arange(n), fps, kind, source)


def _box_like(box: Box, x0: float, y0: float, w: int, h: int) -> Box:
    """Move ``box`` (keeping its size) to the even position nearest ``(x0, y0)``."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    nx = min(max(0, 2 * round(x0 / 2)), w - bw)
    ny = min(max(0, 2 * round(y0 / 2)), h - bh)
    return nx, ny, nx + bw, ny + bh


def _check_box(face_box: FaceBox, w: int, h: int) -> None:
    x, y, bw, bh = face_box
    if bw <= 0 or bh <= 0 or x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
        raise AvatarError(f"face box {tuple(face_box)} lies outside the {w}x{h} image")


# ---------------------------------------------------------------- videos


def avatar_from_video(
    frames: Sequence[np.ndarray],
    *,
    fps: float = 25.0,
    face_box: FaceBox | None = None,
    source: str = "",
    progress: bool = True,
) -> Avatar:
    """An avatar whose frames are the video's, idle loop ping-pong."""
    from tqdm import tqdm

    h, w = frames[0].shape[:2]
    if face_box is not None:
        _check_box(face_box, w, h)
        faces: list[FaceBox | None] = [face_box] * len(frames)
    else:
        faces = []
        for frame in tqdm(frames, unit="frame", desc="detect", disable=not progress, leave=False):
            found = find_faces(frame)
            faces.append(found[0] if found else None)
    known = [i for i, f in enumerate(faces) if f is not None]
    if not known:
        raise AvatarError(
            "no face found in any frame of the video: use a frontal, well-lit clip, "
            "or give the face box yourself (--face-box X Y W H)"
        )
    if len(known) < len(faces):
        logger.info(
            "no face in %d of %d frames: using the nearest", len(faces) - len(known), len(faces)
        )
    filled = np.array([faces[min(known, key=lambda k, i=i: abs(k - i))] for i in range(len(faces))])
    kernel = np.ones(SMOOTH_FRAMES) / SMOOTH_FRAMES
    pad = SMOOTH_FRAMES // 2
    padded = np.pad(filled, ((pad, pad), (0, 0)), mode="edge")
    smooth = np.stack([np.convolve(padded[:, c], kernel, mode="valid") for c in range(4)], axis=1)
    boxes = [crop_box(tuple(b), w, h) for b in smooth]
    crops = np.stack([crop_face(f, b) for f, b in zip(frames, boxes, strict=True)])
    n = len(frames)
    loop = np.concatenate([np.arange(n), np.arange(n - 2, 0, -1)]) if n > 2 else np.arange(n)
    return Avatar(
        np.stack(frames), crops, np.array(boxes), paste_mask().copy(), loop, fps, "video", source
    )


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="portrait image (png, jpg, ...) or short video (mp4, ...)")
    parser.add_argument("--out", dest="out_dir", required=True, help="avatar directory to write")
    parser.add_argument("--fps", type=float, default=25.0, help="frame rate (default 25)")
    parser.add_argument(
        "--size", nargs=2, type=int, metavar=("W", "H"), help="output size (default: the input's)"
    )
    parser.add_argument(
        "--face-box",
        nargs=4,
        type=float,
        metavar=("X", "Y", "W", "H"),
        help="face box in input pixels (skips face detection)",
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=IDLE_SECONDS, help="idle loop length for a still"
    )
    parser.add_argument("--max-seconds", type=float, help="use only the start of a long video")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run ``prepare`` from parsed arguments; print a one-line summary or a plain error."""
    try:
        avatar = prepare(
            args.input,
            args.out_dir,
            face_box=tuple(args.face_box) if args.face_box else None,
            fps=args.fps,
            size=tuple(args.size) if args.size else None,
            idle_seconds=args.idle_seconds,
            max_seconds=args.max_seconds,
            progress=not args.quiet,
        )
    except AvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out_dir}: {avatar.kind}, {avatar.width}x{avatar.height}, "
        f"{len(avatar)} frames at {avatar.fps:g} fps, idle loop {len(avatar.loop)} frames"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="avatar-server prepare", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
