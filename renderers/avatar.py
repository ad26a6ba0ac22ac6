"""The avatar asset: what a face looks like, frame by frame, and where its mouth is.

On disk an avatar is a directory written by ``avatar-server prepare``::

    avatar.json   metadata (below)
    frames.npy    uint8 [N, H, W, 3]  BGR full frames, the base every output frame is drawn on
    crops.npy     uint8 [N, 96, 96, 3] BGR face crops fed to the model (``target``)
    mask.npy      float32 [96, 96]     feathered paste-back mask, in crop coordinates

    avatar.json = {
      "format": "avatar-server/avatar", "version": 1,
      "width": W, "height": H, "fps": 25.0, "frames": N, "crop_size": 96,
      "boxes": [[x0, y0, x1, y1], ...],   one crop box per frame, even coordinates, x1/y1 exclusive
      "loop": [0, 1, ..., N-1, N-2, ..., 1],   frame order of the idle loop (ping-pong for videos)
      "kind": "still" | "video" | "default", "source": "<file name>"
    }

Crop framing follows Wav2Lip: the face box, padded at the bottom for the chin,
made square, resized to 96x96; the mouth then sits around row 71 of the crop.
Speech frames replace only the masked lower face of the crop box, so eyes
(and blinks) always come from the base frame.

The default avatar is drawn here, procedurally (no download, no third-party
image): a stylised portrait whose face box is known, so it needs no detector.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from models.contract import FACE_SIZE

from .base import i420_shape
from .compose import write_region

FORMAT = "avatar-server/avatar"
FORMAT_VERSION = 1
CHIN_PAD = 0.06  # crop box padding below the face box, as a fraction of its height

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), even


class AvatarError(ValueError):
    """An avatar input or directory that cannot be used, explained in plain words."""


@dataclass(eq=False)
class Avatar:
    """A prepared avatar in memory; :attr:`i420` and :attr:`idle` are derived at construction."""

    frames: np.ndarray  # uint8 [N, H, W, 3] BGR
    crops: np.ndarray  # uint8 [N, 96, 96, 3] BGR
    boxes: np.ndarray  # int32 [N, 4] x0, y0, x1, y1
    mask: np.ndarray  # float32 [96, 96] in [0, 1]
    loop: np.ndarray  # int [M] frame indices of the idle loop
    fps: float = 25.0
    kind: str = "still"
    source: str = ""
    i420: np.ndarray = field(init=False, repr=False)  # uint8 [N, H*3/2, W]
    idle: list[np.ndarray] = field(init=False, repr=False)  # I420, in loop order (views)

    def __post_init__(self) -> None:
        n, h, w = self.frames.shape[:3]
        i420_shape(w, h)  # even size
        if self.crops.shape != (n, FACE_SIZE, FACE_SIZE, 3) or self.boxes.shape != (n, 4):
            raise AvatarError(
                f"avatar arrays disagree: {n} frames, crops {self.crops.shape}, "
                f"boxes {self.boxes.shape}"
            )
        if not len(self.loop) or self.loop.min() < 0 or self.loop.max() >= n:
            raise AvatarError(f"avatar idle loop refers to frames outside 0..{n - 1}")
        self.boxes = self.boxes.astype(np.int32)
        self.i420 = np.empty((n, *i420_shape(w, h)), np.uint8)
        for frame, out in zip(self.frames, self.i420, strict=True):
            write_region(out, frame, 0, 0)
        self.idle = [self.i420[k] for k in self.loop]

    @property
    def width(self) -> int:
        return self.frames.shape[2]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    def __len__(self) -> int:
        return len(self.frames)

    def base_index(self, frame_index: int) -> int:
        """The base frame of speech frame ``frame_index``: walks the idle loop's order."""
        return int(self.loop[frame_index % len(self.loop)])

    def resized(self, width: int, height: int) -> Avatar:
        """The same avatar at another even size: scaled to cover, centre-cropped."""
        i420_shape(width, height)
        if (width, height) == (self.width, self.height):
            return self
        scale = max(width / self.width, height / self.height)
        sw, sh = math.ceil(self.width * scale), math.ceil(self.height * scale)
        ox, oy = (sw - width) // 2, (sh - height) // 2
        frames = np.stack(
            [
                cv2.resize(
                    f, (sw, sh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
                )[oy : oy + height, ox : ox + width]
                for f in self.frames
            ]
        )
        boxes = [
            even_box(
                x0 * scale - ox, y0 * scale - oy, x1 * scale - ox, y1 * scale - oy, width, height
            )
            for x0, y0, x1, y1 in self.boxes
        ]
        crops = np.stack([crop_face(f, b) for f, b in zip(frames, boxes, strict=True)])
        return Avatar(
            frames, crops, np.array(boxes), self.mask, self.loop, self.fps, self.kind, self.source
        )


# ---------------------------------------------------------------- framing


def even_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> Box:
    """Round a box outwards to even coordinates and clip it to the frame."""
    bx0 = max(0, 2 * math.floor(x0 / 2))
    by0 = max(0, 2 * math.floor(y0 / 2))
    bx1 = min(width, 2 * math.ceil(x1 / 2))
    by1 = min(height, 2 * math.ceil(y1 / 2))
    if bx1 - bx0 < 8 or by1 - by0 < 8:
        raise AvatarError(f"face box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}) is outside the image")
    return bx0, by0, bx1, by1


def crop_box(face: tuple[float, float, float, float], width: int, height: int) -> Box:
    """Wav2Lip-style crop box for a face box ``(x, y, w, h)``.

    The box is padded below for the chin, made square around its centre line,
    and shifted (not shrunk) to stay inside the frame where it fits.
    """
    x, y, w, h = face
    h_padded = h * (1.0 + CHIN_PAD)
    side = min(max(w, h_padded), width, height)
    cx = x + w / 2
    x0 = min(max(0.0, cx - side / 2), width - side)
    y0 = min(max(0.0, y), height - side)
    return even_box(x0, y0, x0 + side, y0 + side, width, height)


def crop_face(frame: np.ndarray, box: Box) -> np.ndarray:
    """The 96x96 BGR model crop of ``box``."""
    x0, y0, x1, y1 = box
    region = frame[y0:y1, x0:x1]
    shrink = region.shape[0] > FACE_SIZE
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(region, (FACE_SIZE, FACE_SIZE), interpolation=interpolation)


@lru_cache(maxsize=1)
def paste_mask() -> np.ndarray:
    """Feathered mask of the lower face in crop coordinates, zero along the crop border.

    It covers what a Wav2Lip model redraws (the lower half, mouth and jaw) and
    fades out before the crop's edges and before the eyes, so the pasted crop
    never shows a seam and the upper face keeps the base frame's detail.
    """
    s = FACE_SIZE
    ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    ellipse = ((xs - s * 0.5) / (s * 0.40)) ** 2 + ((ys - s * 0.73) / (s * 0.30)) ** 2
    mask = cv2.GaussianBlur(np.clip((1.0 - ellipse) / 0.45, 0.0, 1.0), (0, 0), s * 0.03)
    mask = mask * mask * (3 - 2 * mask)  # smoothstep: a soft shoulder
    edge = np.clip(np.minimum.reduce([xs, ys, s - xs, s - ys]) / (s * 0.08) - 0.1, 0.0, 1.0)
    mask = (mask * edge * edge * (3 - 2 * edge)).astype(np.float32)
    mask.setflags(write=False)
    return mask


# ---------------------------------------------------------------- on disk


def save_avatar(avatar: Avatar, out_dir: str | Path) -> Path:
    """Write ``avatar`` as an avatar directory (see the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "frames.npy", np.ascontiguousarray(avatar.frames))
    np.save(out / "crops.npy", np.ascontiguousarray(avatar.crops))
    np.save(out / "mask.npy", np.ascontiguousarray(avatar.mask, dtype=np.float32))
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "width": avatar.width,
        "height": avatar.height,
        "fps": avatar.fps,
        "frames": len(avatar),
        "crop_size": FACE_SIZE,
        "boxes": avatar.boxes.tolist(),
        "loop": [int(k) for k in avatar.loop],
        "kind": avatar.kind,
        "source": avatar.source,
    }
    (out / "avatar.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_avatar(path: str | Path | None = None, *, fps: float = 25.0) -> Avatar:
    """Load an avatar directory; ``None`` gives the built-in default avatar (512x512)."""
    if path is None:
        return default_avatar(fps=fps)
    root = Path(path)
    if not root.is_dir():
        raise AvatarError(f"avatar directory not found: {root}")
    meta_path = root / "avatar.json"
    if not meta_path.is_file():
        raise AvatarError(
            f"{root} is not an avatar directory (no avatar.json); "
            "make one with 'avatar-server prepare IMAGE_OR_VIDEO OUT_DIR'"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AvatarError(f"cannot read {meta_path}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise AvatarError(
            f"{meta_path} is not an avatar description (format {meta.get('format')!r})"
        )
    if meta.get("version", 0) > FORMAT_VERSION:
        raise AvatarError(
            f"{root} was written by a newer version (avatar format {meta['version']}, "
            f"this one reads up to {FORMAT_VERSION}); prepare it again with this version"
        )
    try:
        frames = np.load(root / "frames.npy")
        crops = np.load(root / "crops.npy")
        mask = np.load(root / "mask.npy")
    except (OSError, ValueError) as exc:
        raise AvatarError(f"avatar directory {root} is incomplete or damaged: {exc}") from exc
    n = meta.get("frames")
    if frames.ndim != 4 or len(frames) != n or frames.dtype != np.uint8:
        raise AvatarError(
            f"{root}: frames.npy holds {frames.shape} {frames.dtype}, avatar.json says {n} frames"
        )
    if mask.shape != (FACE_SIZE, FACE_SIZE):
        raise AvatarError(f"{root}: mask.npy is {mask.shape}, expected ({FACE_SIZE}, {FACE_SIZE})")
    return Avatar(
        frames,
        crops,
        np.asarray(meta["boxes"], dtype=np.int32).reshape(-1, 4),
        mask.astype(np.float32),
        np.asarray(meta.get("loop") or range(n), dtype=np.int64),
        float(meta.get("fps", fps)),
        str(meta.get("kind", "still")),
        str(meta.get("source", "")),
    )


# ---------------------------------------------------------------- the built-in avatar


@dataclass(frozen=True)
class Portrait:
    """A still image with its face box ``(x, y, w, h)`` and eye boxes, positions known."""

    image: np.ndarray  # uint8 [H, W, 3] BGR
    face_box: tuple[float, float, float, float]
    eyes: tuple[tuple[float, float, float, float], ...]  # (x, y, w, h) each


def draw_portrait(width: int = 512, height: int = 512) -> Portrait:
    """Draw the built-in stylised portrait (head, hair, eyes, nose, closed lips).

    The head is laid out on a square of side ``min(width, height)`` centred in
    the frame; all positions below are fractions of that side.  The face box
    is where a frontal-face detector puts it, which frames the crop so that
    the lips' line falls on row ~71 of the 96x96 model crop.
    """
    side = min(width, height)
    ox, oy = (width - side) / 2, (height - side) / 2
    sub = 16  # cv2 drawing with 4 fractional bits

    def pt(x: float, y: float) -> tuple[int, int]:
        return round((ox + x * side) * sub), round((oy + y * side) * sub)

    def ln(r: float) -> int:
        return round(r * side * sub)

    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top, bottom = np.array([120, 105, 95], np.float32), np.array([80, 70, 60], np.float32)
    img = np.ascontiguousarray(
        np.broadcast_to(top + (bottom - top) * t, (height, width, 3)).astype(np.uint8)
    )

    def ellipse(c, axes, color, start=0, end=360, angle=0, thickness=-1) -> None:
        cv2.ellipse(
            img,
            pt(*c),
            (ln(axes[0]), ln(axes[1])),
            angle,
            start,
            end,
            color,
            thickness,
            cv2.LINE_AA,
            4,
        )

    skin, shade, hair = (140, 172, 214), (112, 140, 184), (30, 38, 52)
    ellipse((0.5, 1.02), (0.40, 0.24), (92, 62, 48))  # shoulders
    neck = np.array([pt(0.42, 0.60), pt(0.58, 0.60), pt(0.59, 0.80), pt(0.41, 0.80)], np.int32)
    cv2.fillPoly(img, [neck], shade, cv2.LINE_AA, 4)
    ellipse((0.5, 0.795), (0.09, 0.035), shade)
    ellipse((0.5, 0.40), (0.225, 0.255), hair)
    ellipse((0.31, 0.47), (0.03, 0.055), shade)  # ears
    ellipse((0.69, 0.47), (0.03, 0.055), shade)
    ellipse((0.5, 0.465), (0.19, 0.245), skin)  # face
    ellipse((0.5, 0.285), (0.205, 0.09), hair, 180, 360)  # fringe
    ellipse((0.40, 0.30), (0.11, 0.06), hair, angle=-15)
    ellipse((0.61, 0.295), (0.10, 0.055), hair, angle=20)

    # Soft shading inside the face: eye sockets, under the nose and lip, cheeks.
    face = np.zeros((height, width), np.uint8)
    cv2.ellipse(face, pt(0.5, 0.465), (ln(0.19), ln(0.245)), 0, 0, 360, 255, -1, cv2.LINE_AA, 4)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    darken = np.zeros((height, width), np.float32)
    for cx, cy, rx, ry, amount in (
        (0.42, 0.43, 0.06, 0.035, 0.25),
        (0.58, 0.43, 0.06, 0.035, 0.25),
        (0.50, 0.56, 0.04, 0.015, 0.18),
        (0.50, 0.655, 0.05, 0.015, 0.15),
        (0.33, 0.55, 0.05, 0.12, 0.20),
        (0.67, 0.55, 0.05, 0.12, 0.20),
    ):
        gx = (xx - (ox + cx * side)) / (rx * side)
        gy = (yy - (oy + cy * side)) / (ry * side)
        darken += amount * np.exp(-(gx * gx + gy * gy))
    darken *= face.astype(np.float32) / 255.0
    img = (img * (1.0 - np.clip(darken, 0.0, 0.9))[..., None]).astype(np.uint8)

    brow_thickness = max(1, round(0.012 * side))
    eyes = []
    for sx in (-1, 1):
        cx = 0.5 + sx * 0.08
        ellipse(
            (0.5 + sx * 0.085, 0.405),
            (0.05, 0.018),
            (40, 50, 70),
            200,
            340,
            thickness=brow_thickness,
        )
        ellipse((cx, 0.44), (0.036, 0.016), (235, 240, 240))  # sclera
        cv2.circle(img, pt(cx, 0.44), ln(0.0145), (60, 75, 95), -1, cv2.LINE_AA, 4)  # iris
        cv2.circle(img, pt(cx, 0.44), ln(0.007), (15, 15, 20), -1, cv2.LINE_AA, 4)  # pupil
        cv2.circle(img, pt(cx + 0.005, 0.436), ln(0.003), (250, 250, 250), -1, cv2.LINE_AA, 4)
        ellipse((cx, 0.44), (0.037, 0.017), (50, 60, 80), 185, 355, thickness=2)  # upper lid
        eyes.append((ox + (cx - 0.045) * side, oy + 0.414 * side, 0.09 * side, 0.052 * side))
    ellipse((0.5, 0.535), (0.022, 0.012), (110, 135, 178), 10, 170, thickness=2)  # nose
    ellipse((0.484, 0.54), (0.007, 0.004), (80, 95, 130))
    ellipse((0.516, 0.54), (0.007, 0.004), (80, 95, 130))
    ellipse((0.5, 0.612), (0.055, 0.014), (84, 88, 165), 180, 360)  # upper lip
    ellipse((0.5, 0.612), (0.05, 0.02), (92, 98, 178), 0, 180)  # lower lip
    cv2.line(img, pt(0.447, 0.612), pt(0.553, 0.612), (40, 40, 80), 2, cv2.LINE_AA, 4)

    face_box = (ox + 0.255 * side, oy + 0.228 * side, 0.49 * side, 0.49 * side)
    return Portrait(img, face_box, tuple(eyes))


def default_avatar(width: int = 512, height: int = 512, fps: float = 25.0) -> Avatar:
    """The built-in avatar: the drawn portrait with a breathing, blinking idle loop.

    Built in memory (a fraction of a second at 512x512) and kept for the
    process, so nothing is written to disk and nothing is downloaded.
    """
    return _default_avatar(width, height, float(fps))


@lru_cache(maxsize=2)
def _default_avatar(width: int, height: int, fps: float) -> Avatar:
    from .prepare import avatar_from_still

    portrait = draw_portrait(width, height)
    return avatar_from_still(
        portrait.image,
        portrait.face_box,
        fps=fps,
        eyes=portrait.eyes,
        kind="default",
        source="built-in portrait",
    )
