"""The built-in lip-sync model: parametric, for demos and tests, not a trained network.

It has the Wav2Lip I/O contract (:mod:`models.contract`) so that everything
around it (features, batching, export, the ONNX backend) runs exactly as with
real weights, and it ships as a few kilobytes of ONNX.  Nothing in it is
learned: the mouth follows two hand-set measures of the mel window.

    mel window [B, 1, 80, 16]  (values in [-4, 4], silence = -4)
      openness  = smoothstep of the loudness of the first ~90 ms (mean over bands)
      spread    = tanh of high-band minus low-band level: > 0 wide (ee, s), < 0 round (oo)

    reference face (target channels 3-5) [B, 3, 96, 96]
      -> grid_sample warp (each output pixel samples the reference dy px above it):

             row        dy
             cy - 8     0                  upper lip lifts by 0.22 gap(x)
             cy         -0.22 gap(x)  ──┐  step across the lip line: the lips part
             cy + 1     gap(x)        ◀─┘  by gap(x) = jaw_drop * openness * lens(x)
             cy + 2..16 -> jaw(x)          turning into a broader jaw profile,
             cy + 8..95 -> 0               faded out at the crop's bottom edge

         plus a sideways stretch about the mouth centre with spread
      -> dark inner mouth filling the parted lips (hiding the smear of the step),
         upper teeth along its top edge once open enough
      -> blended back into the reference with a soft mask around mouth and jaw

Every displacement and the inner mouth scale with openness, so in silence the
output is the reference (to float rounding).  Away from the lip line the warp's
slopes stay below 1, so it never folds.

Coordinates are pixels of the 96x96 crop, x to the right, y down.  The defaults
place the mouth where the usual Wav2Lip face-crop framing puts it: centred
horizontally, the lips between rows ~62 and ~80, the line between them at 71.
"""

from __future__ import annotations

import torch
from torch import nn

from .contract import FACE_SIZE, MEL_BANDS, MEL_STEPS

# Loudness (mean normalised mel, [-4, 4]) at which the mouth starts to open and is fully open:
# -2.8 is just above a noise floor of -55 dBFS, -0.4 loud speech.
QUIET_LEVEL = -2.8
LOUD_LEVEL = -0.4
CAVITY_BGR = (0.10, 0.09, 0.22)
TEETH_BGR = (0.86, 0.89, 0.92)


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = torch.clamp(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class ParametricLipSync(nn.Module):
    """Audio-driven mouth warp with the Wav2Lip interface (see the module docstring)."""

    def __init__(
        self,
        mouth_center: tuple[float, float] = (48.0, 71.0),
        mouth_half_width: float = 14.0,
        jaw_drop: float = 7.0,
        size: int = FACE_SIZE,
    ) -> None:
        super().__init__()
        self.mouth_center = mouth_center
        self.mouth_half_width = mouth_half_width
        self.jaw_drop = jaw_drop
        self.size = size
        coords = torch.arange(size, dtype=torch.float32)
        self.register_buffer("xs", coords.view(1, 1, size), persistent=False)
        self.register_buffer("ys", coords.view(1, size, 1), persistent=False)
        # The mouth at a frame's time follows the first mel frames of its window
        # (the window starts at the frame); a little of what follows smooths it.
        weights = torch.tensor([0.12, 0.22, 0.24, 0.18, 0.12, 0.07, 0.05])
        time_weights = torch.zeros(MEL_STEPS)
        time_weights[: len(weights)] = weights / weights.sum()
        self.register_buffer("time_weights", time_weights, persistent=False)
        self.register_buffer(
            "cavity_bgr", torch.tensor(CAVITY_BGR).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "teeth_bgr", torch.tensor(TEETH_BGR).view(1, 3, 1, 1), persistent=False
        )

    # ------------------------------------------------------------ audio -> mouth shape

    def mouth_shape(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Openness in [0, 1] and spread in [-1, 1], each [B]."""
        per_frame = source[:, 0]  # [B, 80, 16]
        loudness = (per_frame.mean(dim=1) * self.time_weights).sum(dim=1)
        openness = _smoothstep((loudness - QUIET_LEVEL) / (LOUD_LEVEL - QUIET_LEVEL))
        low = (per_frame[:, :20].mean(dim=1) * self.time_weights).sum(dim=1)
        high = (per_frame[:, MEL_BANDS - 35 :].mean(dim=1) * self.time_weights).sum(dim=1)
        spread = torch.tanh((high - low + 0.6) / 1.2)
        return openness, spread

    # ------------------------------------------------------------ forward

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        reference = target[:, 3:6]
        openness, spread = self.mouth_shape(source)
        o = openness.view(-1, 1, 1)
        s = spread.view(-1, 1, 1)
        cx, cy = self.mouth_center
        xs, ys = self.xs, self.ys

        # Horizontal stretch about the mouth centre: wider for spread vowels, narrower for round.
        stretch = 0.12 * s * o
        half_width = self.mouth_half_width * (1.0 + stretch)
        u = (xs - cx) / half_width  # mouth-relative x in the output, +-1 at the corners
        region = torch.exp(-((u / 1.4) ** 2) - ((ys - cy) / 9.0) ** 2)
        dx = (xs - cx) * stretch / (1.0 + stretch) * region

        # The lips part along a lens: ``gap`` px at each column, most in the middle,
        # none at the corners; round shapes open narrower and taller.
        lens = torch.clamp(1.0 - (u / (0.85 - 0.1 * s)) ** 2, 0.0, 1.0) ** 0.75
        gap = self.jaw_drop * o * (1.0 - 0.2 * s) * lens  # [B, 1, W]
        lift = 0.22 * gap  # the upper lip rises a little
        # Below the lip line everything moves down: by ``gap`` at the lower lip, by a
        # broader jaw profile further down, fading out before the crop's bottom edge
        # (slopes stay below 1, so the jaw never folds).
        jaw = self.jaw_drop * o * torch.exp(-((u / 1.7) ** 4))
        to_jaw = _smoothstep((ys - cy - 2.0) / 14.0)
        fade = 1.0 - _smoothstep((ys - cy - 8.0) / (self.size - 1 - cy - 8.0))
        lower = (gap + (jaw - gap) * to_jaw) * fade
        upper = -lift * torch.exp(-(((cy - ys) / 4.0) ** 2))
        below = _smoothstep((ys - cy) / 1.5 + 0.5)  # steps across the lip line
        dy = upper + (lower - upper) * below  # output pixel samples the reference dy px above

        grid_x = (xs - dx + 0.5) * (2.0 / self.size) - 1.0
        grid_y = (ys - dy + 0.5) * (2.0 / self.size) - 1.0
        grid = torch.stack([grid_x.expand_as(dy), grid_y.expand_as(dy)], dim=-1)
        warped = nn.functional.grid_sample(
            reference, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

        # Inner mouth fills the opening between the lips (where the warp smeared the lip
        # line), darker in the middle, with the upper teeth along its top once open enough.
        top, bottom = cy - lift, cy + gap
        cavity = (
            _smoothstep((ys - top) / 0.8 + 0.5)
            * _smoothstep((bottom - ys) / 0.8 + 0.5)
            * torch.clamp(gap, 0.0, 1.0)
            * _smoothstep(o / 0.1)
        )
        depth = torch.clamp((ys - top) / torch.clamp(bottom - top, min=1e-3), 0.0, 1.0)
        shade = 0.55 + 0.45 * (2.0 * depth - 1.0) ** 2  # 1 at the lips, 0.55 in the middle
        teeth_height = torch.clamp(0.3 * (gap + lift), max=2.5)
        teeth = (
            _smoothstep((top + teeth_height - ys) / 0.8 + 0.5)
            * _smoothstep((0.8 - u.abs()) / 0.25)
            * _smoothstep((o - 0.3) / 0.3)
        )
        inner = self.cavity_bgr * shade.unsqueeze(1)
        inner = inner + (self.teeth_bgr - inner) * teeth.unsqueeze(1)
        mouth = warped + (inner - warped) * cavity.unsqueeze(1)

        # Soft mask: only the mouth and jaw area may differ from the reference.
        mask = torch.exp(-((u / 1.9) ** 4) - ((ys - cy - 6.0) / 18.0) ** 4).unsqueeze(1)
        return torch.clamp(reference + (mouth - reference) * mask, 0.0, 1.0)


def build(seed: int | None = None) -> ParametricLipSync:
    """The built-in model in eval mode (``seed`` is accepted for symmetry; nothing is random)."""
    del seed
    return ParametricLipSync().eval()
