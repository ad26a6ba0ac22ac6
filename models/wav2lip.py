"""A reference network with the layer sizes of the Wav2Lip-96 generator, random weights.

Prajwal et al., "A Lip Sync Expert Is All You Need for Speech to Lip Generation
In the Wild" (ACM MM 2020).  It exists so that benchmarks measure the cost of a
real-size lip-sync model (~36M parameters) without shipping or downloading
trained weights; its output is noise-like.  Same I/O as the built-in model
(:mod:`models.contract`).

Shape walk (B = batch)::

    source [B,1,80,16] --audio encoder--> [B,512,1,1]
        80x16 -> 27x16 (stride 3,1) -> 9x6 (stride 3) -> 3x3 (stride 3,2) -> 1x1

    target [B,6,96,96] --face encoder-->  skip features
        96 (16ch) -> 48 (32) -> 24 (64) -> 12 (128) -> 6 (256) -> 3 (512) -> 1 (512)

    decoder, starting from the audio embedding; each stage's output is
    concatenated with the face feature of the same size (the U-Net skips):
        1 (512) +512 -> 3 (512) +512 -> 6 (512) +256 -> 12 (384) +128 -> 24 (256)
        +64 -> 48 (128) +32 -> 96 (64) +16 -> conv 80->32 -> conv 32->3 -> sigmoid

Every conv is conv + batch norm + ReLU; "residual" convs keep the shape and add
their input before the ReLU.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvUnit(nn.Module):
    """Conv (or transposed conv) + batch norm + ReLU, optionally with an identity skip."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int | tuple[int, int] = 1,
        padding: int = 0,
        *,
        residual: bool = False,
        transposed: bool = False,
        output_padding: int = 0,
    ) -> None:
        super().__init__()
        if transposed:
            conv = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding)
        else:
            conv = nn.Conv2d(cin, cout, kernel, stride, padding)
        self.body = nn.Sequential(conv, nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return torch.relu(y + x if self.residual else y)


def _down(cin: int, cout: int, stride: int | tuple[int, int], n_res: int, k: int = 3, p: int = 1):
    """One strided conv followed by ``n_res`` residual convs at the new width."""
    units = [ConvUnit(cin, cout, k, stride, p)]
    units += [ConvUnit(cout, cout, 3, 1, 1, residual=True) for _ in range(n_res)]
    return nn.Sequential(*units)


def _up(cin: int, cout: int, stride: int, padding: int, output_padding: int, n_res: int):
    """One transposed conv (upsampling) followed by ``n_res`` residual convs."""
    units = [
        ConvUnit(cin, cout, 3, stride, padding, transposed=True, output_padding=output_padding)
    ]
    units += [ConvUnit(cout, cout, 3, 1, 1, residual=True) for _ in range(n_res)]
    return nn.Sequential(*units)


class Wav2Lip96(nn.Module):
    """Wav2Lip-96 generator layout; see the module docstring for the shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.face_encoder = nn.ModuleList(
            [
                nn.Sequential(ConvUnit(6, 16, 7, 1, 3)),  # 96
                _down(16, 32, 2, 2),  # 48
                _down(32, 64, 2, 3),  # 24
                _down(64, 128, 2, 2),  # 12
                _down(128, 256, 2, 2),  # 6
                _down(256, 512, 2, 1),  # 3
                nn.Sequential(ConvUnit(512, 512, 3, 1, 0), ConvUnit(512, 512, 1, 1, 0)),  # 1
            ]
        )
        self.audio_encoder = nn.Sequential(
            _down(1, 32, 1, 2),  # 80x16
            _down(32, 64, (3, 1), 2),  # 27x16
            _down(64, 128, 3, 2),  # 9x6
            _down(128, 256, (3, 2), 1),  # 3x3
            ConvUnit(256, 512, 3, 1, 0),  # 1x1
            ConvUnit(512, 512, 1, 1, 0),
        )
        self.face_decoder = nn.ModuleList(
            [
                nn.Sequential(ConvUnit(512, 512, 1, 1, 0)),  # 1
                _up(1024, 512, 1, 0, 0, 1),  # 3
                _up(1024, 512, 2, 1, 1, 2),  # 6
                _up(768, 384, 2, 1, 1, 2),  # 12
                _up(512, 256, 2, 1, 1, 2),  # 24
                _up(320, 128, 2, 1, 1, 2),  # 48
                _up(160, 64, 2, 1, 1, 2),  # 96
            ]
        )
        self.output_block = nn.Sequential(
            ConvUnit(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid()
        )

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = self.audio_encoder(source)
        skips = []
        feature = target
        for block in self.face_encoder:
            feature = block(feature)
            skips.append(feature)
        for block in self.face_decoder:
            x = torch.cat([block(x), skips.pop()], dim=1)
        return self.output_block(x)


def build(seed: int = 0) -> Wav2Lip96:
    """The reference network with seeded random weights, in eval mode."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Wav2Lip96()
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
