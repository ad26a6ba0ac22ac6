"""Pasting the model's face crop back into the frame, and converting to I420.

For each speech frame, with ``box`` the base frame's crop box (even coordinates)::

    model output [3, 96, 96] BGR 0-1
      -> resized to the box (bilinear)                         } paste
      -> blended over the box region of the base frame,        }
         weight = the feathered mask resized to the box        }
      -> the region converted to Y, U, V                       } to_i420
      -> written over a copy of the base frame's I420          }
         (or straight into the caller's buffer: a frame ring slot)

Only the box region is converted: the base frames' I420 is computed once
(``Avatar.i420``), and because the box has even coordinates its chroma samples
are exactly the full frame's, so patching equals converting the whole frame.

Colour (BT.601, limited range: what encoders assume for untagged yuv420p)::

    Y = 16  + ( 65.481 R + 128.553 G +  24.966 B) / 255
    U = 128 + (-37.797 R -  74.203 G + 112.000 B) / 255     from the mean of each 2x2 block
    V = 128 + (112.000 R -  93.786 G -  18.214 B) / 255

rounded half up and clipped to 0-255.  :class:`FrameComposer` does this with
numpy/OpenCV on the CPU; :class:`TorchFrameComposer` does the same arithmetic on
torch tensors (on the GPU when the model runs there, so only finished frames
cross the bus).  The two agree to one code value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from .avatar import Avatar

# Rows: Y, U, V; columns: B, G, R (OpenCV's channel order), offset.
YUV_FROM_BGR = (
    np.array(
        [
            [24.966, 128.553, 65.481, 16.0 * 255],
            [112.0, -74.203, -37.797, 128.0 * 255],
            [-18.214, -93.786, 112.0, 128.0 * 255],
        ],
        dtype=np.float64,
    )
    / 255.0
)


def _to_u8(values: np.ndarray) -> np.ndarray:
    return np.clip(values + 0.5, 0.0, 255.0).astype(np.uint8)


def i420_planes(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the Y, U and V planes of an I420 array of shape ``(h * 3 // 2, w)``."""
    h, w = frame.shape[0] * 2 // 3, frame.shape[1]
    q = h // 4
    return (
        frame[:h],
        frame[h : h + q].reshape(h // 2, w // 2),
        frame[h + q :].reshape(h // 2, w // 2),
    )


def write_region(frame: np.ndarray, region: np.ndarray, x0: int, y0: int) -> None:
    """Convert a BGR region (float 0-255 or uint8, even size) into ``frame`` at even x0, y0."""
    region = np.asarray(region, dtype=np.float32)
    rh, rw = region.shape[:2]
    y_plane, u_plane, v_plane = i420_planes(frame)
    y_plane[y0 : y0 + rh, x0 : x0 + rw] = _to_u8(cv2.transform(region, YUV_FROM_BGR[:1]))
    half = cv2.resize(region, (rw // 2, rh // 2), interpolation=cv2.INTER_AREA)  # 2x2 means
    uv = cv2.transform(half, YUV_FROM_BGR[1:])
    u_plane[y0 // 2 : (y0 + rh) // 2, x0 // 2 : (x0 + rw) // 2] = _to_u8(uv[..., 0])
    v_plane[y0 // 2 : (y0 + rh) // 2, x0 // 2 : (x0 + rw) // 2] = _to_u8(uv[..., 1])


def bgr_to_i420(bgr: np.ndarray) -> np.ndarray:
    """A whole BGR frame (even size) -> I420 ``uint8 (h * 3 // 2, w)``."""
    h, w = bgr.shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"I420 needs even dimensions, got {w}x{h}")
    out = np.empty((h * 3 // 2, w), np.uint8)
    write_region(out, bgr, 0, 0)
    return out


class FrameComposer:
    """numpy/OpenCV composition for one avatar (see the module docstring)."""

    def __init__(self, avatar: Avatar) -> None:
        self.avatar = avatar
        self._masks: dict[tuple[int, int], np.ndarray] = {}

    def paste(self, base: int, face: np.ndarray) -> np.ndarray:
        """Blend a model output ``[3, 96, 96]`` (0-1) over base frame ``base``'s box: float BGR."""
        x0, y0, x1, y1 = self.avatar.boxes[base]
        size = (int(x1 - x0), int(y1 - y0))
        face_hwc = np.ascontiguousarray(np.asarray(face, dtype=np.float32).transpose(1, 2, 0))
        resized = cv2.resize(face_hwc * np.float32(255.0), size, interpolation=cv2.INTER_LINEAR)
        region = self.avatar.frames[base, y0:y1, x0:x1].astype(np.float32)
        return region + self._mask(size) * (resized - region)

    def to_i420(self, base: int, region: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Base frame ``base`` in I420 with its box replaced by ``region``, written into
        ``out`` when given (e.g. a frame ring slot: no temporary frame)."""
        x0, y0 = self.avatar.boxes[base][:2]
        if out is None:
            out = self.avatar.i420[base].copy()
        else:
            np.copyto(out, self.avatar.i420[base])
        write_region(out, region, int(x0), int(y0))
        return out

    def compose(
        self, bases: Sequence[int], faces: np.ndarray, out: Sequence[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        targets = out if out is not None else [None] * len(bases)
        return [
            self.to_i420(b, self.paste(b, f), t)
            for b, f, t in zip(bases, faces, targets, strict=True)
        ]

    def _mask(self, size: tuple[int, int]) -> np.ndarray:
        mask = self._masks.get(size)
        if mask is None:
            mask = cv2.resize(self.avatar.mask, size, interpolation=cv2.INTER_LINEAR)[..., None]
            self._masks[size] = mask
        return mask


class TorchFrameComposer:
    """The same composition on torch tensors, on ``device`` (see the module docstring)."""

    def __init__(self, avatar: Avatar, device: Any = "cpu") -> None:
        import torch

        self._torch = torch
        self.avatar = avatar
        self.device = torch.device(device)
        self.frames = torch.from_numpy(np.ascontiguousarray(avatar.frames)).to(self.device)
        self.i420 = torch.from_numpy(np.ascontiguousarray(avatar.i420)).to(self.device)
        self.mask = torch.from_numpy(np.ascontiguousarray(avatar.mask)).to(self.device)
        yuv = torch.tensor(YUV_FROM_BGR, dtype=torch.float32, device=self.device)
        self._weights, self._offsets = yuv[:, :3], yuv[:, 3]
        self._masks: dict[tuple[int, int], Any] = {}

    def paste(self, base: int, face):
        """``face``: tensor [3, 96, 96] in 0-1 -> float BGR region tensor [3, h, w] (0-255)."""
        functional = self._torch.nn.functional
        x0, y0, x1, y1 = (int(v) for v in self.avatar.boxes[base])
        size = (y1 - y0, x1 - x0)
        resized = functional.interpolate(
            face[None].float() * 255.0, size=size, mode="bilinear", align_corners=False
        )[0]
        region = self.frames[base, y0:y1, x0:x1].permute(2, 0, 1).float()
        return region + self._mask(size) * (resized - region)

    def to_i420(self, base: int, region):
        """Base frame ``base`` in I420 (uint8 tensor) with its box replaced by ``region``."""
        torch = self._torch
        x0, y0 = (int(v) for v in self.avatar.boxes[base][:2])
        rh, rw = region.shape[1:]
        out = self.i420[base].clone()
        h, w = self.avatar.height, self.avatar.width
        q = h // 4
        luma = torch.einsum("c,chw->hw", self._weights[0], region) + self._offsets[0]
        half = torch.nn.functional.avg_pool2d(region[None], 2)[0]
        chroma = (
            torch.einsum("kc,chw->khw", self._weights[1:], half) + self._offsets[1:, None, None]
        )
        out[:h][y0 : y0 + rh, x0 : x0 + rw] = self._to_u8(luma)
        cy, cx, ch, cw = y0 // 2, x0 // 2, rh // 2, rw // 2
        out[h : h + q].view(h // 2, w // 2)[cy : cy + ch, cx : cx + cw] = self._to_u8(chroma[0])
        out[h + q :].view(h // 2, w // 2)[cy : cy + ch, cx : cx + cw] = self._to_u8(chroma[1])
        return out

    def compose(self, bases: Sequence[int], faces, out: Sequence[np.ndarray] | None = None):
        """Compose a batch and bring the finished frames to the host: in one copy, or
        each straight into its buffer in ``out`` (frame ring slots)."""
        frames = [self.to_i420(b, self.paste(b, f)) for b, f in zip(bases, faces, strict=True)]
        if out is None:
            return list(self._torch.stack(frames).cpu().numpy())
        for frame, target in zip(frames, out, strict=True):
            self._torch.from_numpy(target).copy_(frame.reshape(target.shape))
        return list(out)

    def _to_u8(self, values):
        return (values + 0.5).clamp_(0.0, 255.0).to(self._torch.uint8)

    def _mask(self, size: tuple[int, int]):
        mask = self._masks.get(size)
        if mask is None:
            mask = self._torch.nn.functional.interpolate(
                self.mask[None, None], size=size, mode="bilinear", align_corners=False
            )[0]
            self._masks[size] = mask
        return mask
