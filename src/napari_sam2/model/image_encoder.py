"""Image encoder: Hiera trunk + FPN neck with sine position encodings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import SinePositionEncoding
from .hiera import Hiera


@dataclass
class BackboneOutput:
    """Multi-scale features of a batch of images.

    ``fpn`` and ``pos`` hold the kept FPN levels, highest resolution first:
    at 1024 px and scalp 1 that is B C 256 256, B C 128 128 and B C 64 64.
    """

    fpn: List[torch.Tensor]
    pos: List[torch.Tensor]

    @property
    def vision_features(self) -> torch.Tensor:
        """The lowest-resolution level (B C 64 64 at 1024 px)."""
        return self.fpn[-1]


class FpnNeck(nn.Module):
    """Lateral 1x1 convs to d_model with nearest-neighbour top-down fusion.

    Only the levels in ``top_down_levels`` receive the upsampled coarser
    features; the two finest levels are plain lateral projections.
    """

    def __init__(self, *, d_model: int, backbone_channel_list: Sequence[int], top_down_levels: Sequence[int]) -> None:
        super().__init__()
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.top_down_levels = set(top_down_levels)
        # convs[j] projects the j-th coarsest level; key names follow the checkpoints
        self.convs = nn.ModuleList()
        for dim in backbone_channel_list:
            seq = nn.Sequential()
            seq.add_module("conv", nn.Conv2d(dim, d_model, kernel_size=1))
            self.convs.append(seq)
        self.position_encoding = SinePositionEncoding(d_model)

    def forward(self, xs: List[torch.Tensor]):
        n = len(self.convs) - 1
        out: List[torch.Tensor] = [None] * (n + 1)  # type: ignore[list-item]
        prev = None
        for i in range(n, -1, -1):  # coarse to fine
            lateral = self.convs[n - i](xs[i])
            if i in self.top_down_levels and prev is not None:
                top_down = F.interpolate(prev.to(torch.float32), scale_factor=2.0, mode="nearest")
                prev = lateral + top_down
            else:
                prev = lateral
            out[i] = prev
        pos = [self.position_encoding(x).to(x.dtype) for x in out]
        return out, pos


class ImageEncoder(nn.Module):
    """Trunk + neck; drops the ``scalp`` coarsest levels."""

    def __init__(self, *, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(
                f"trunk channels {trunk.channel_list} do not match neck {neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """B 3 S S normalised images -> BackboneOutput."""
        fpn, pos = self.neck(self.trunk(images))
        if self.scalp > 0:
            fpn, pos = fpn[: -self.scalp], pos[: -self.scalp]
        return BackboneOutput(fpn=list(fpn), pos=list(pos))
