"""Small building blocks shared by several SAM 2 components."""

from __future__ import annotations

import math
from typing import Tuple, Type

import torch
from torch import nn


class MLP(nn.Module):
    """``num_layers`` linear layers with an activation between them.

    Parameter names (``layers.{i}.weight``) match the official checkpoints.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        *,
        activation: Type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.act(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a B C H W tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


# --------------------------------------------------------------------------- positions


def sine_position_encoding_2d(
    height: int,
    width: int,
    channels: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """DETR-style normalised sine encoding of a grid, shape C H W.

    The first half of the channels encodes y, the second half x; within each
    half, even channels hold sines and odd channels cosines.
    """
    half = channels // 2
    scale = 2 * math.pi
    eps = 1e-6
    ys = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    xs = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    ys = ys / (ys[-1] + eps) * scale
    xs = xs / (xs[-1] + eps) * scale
    dim_t = torch.arange(half, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)

    def encode(v: torch.Tensor) -> torch.Tensor:  # N -> N half
        p = v[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pe_y = encode(ys)[:, None, :].expand(height, width, half)  # H W half
    pe_x = encode(xs)[None, :, :].expand(height, width, half)  # H W half
    return torch.cat((pe_y, pe_x), dim=2).permute(2, 0, 1).contiguous()  # C H W


class SinePositionEncoding(nn.Module):
    """Sine position encoding of a feature map, cached per (H, W, device)."""

    def __init__(self, channels: int, temperature: float = 10000.0) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError("channels must be even")
        self.channels = channels
        self.temperature = temperature
        self._cache: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B C H W feature map -> B channels H W encoding (float32)."""
        key = (x.shape[-2], x.shape[-1], x.device)
        pe = self._cache.get(key)
        if pe is None:
            pe = sine_position_encoding_2d(
                x.shape[-2], x.shape[-1], self.channels,
                temperature=self.temperature, device=x.device,
            )
            self._cache[key] = pe
        return pe.unsqueeze(0).expand(x.shape[0], -1, -1, -1)


def sine_position_encoding_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Transformer sine encoding of (possibly fractional) positions: N -> N dim."""
    half = dim // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    p = positions.unsqueeze(-1) / dim_t
    return torch.cat([p.sin(), p.cos()], dim=-1)


class RandomPositionEncoding(nn.Module):
    """Fourier features with a fixed random Gaussian matrix (SAM prompt encoder)."""

    def __init__(self, num_pos_feats: int = 64) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates in [0, 1], ... x 2 -> ... x 2*num_pos_feats."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([coords.sin(), coords.cos()], dim=-1)

    def grid(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of pixel centres of an H x W grid, shape C H W."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return self.encode(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)

    def points(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates B N 2 (x, y) in an image of (H, W) -> B N C."""
        h, w = image_size
        scale = coords.new_tensor([1.0 / w, 1.0 / h])
        return self.encode(coords.float() * scale)


# --------------------------------------------------------------------------- RoPE


def axial_rope_angles(dim: int, end_x: int, end_y: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of 2D axial RoPE for a row-major end_y x end_x grid.

    Returns N x dim/2 angles, N = end_x * end_y: the first dim/4 rotate
    channel pairs by the x position, the next dim/4 by the y position.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))
    t = torch.arange(end_x * end_y, dtype=torch.float32)
    t_x = t % end_x
    t_y = torch.div(t, end_x, rounding_mode="floor")
    return torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (... N C) by angles given as cos/sin (N C/2)."""
    x_pairs = x.float().unflatten(-1, (-1, 2))  # ... N C/2 2
    a, b = x_pairs.unbind(-1)
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).type_as(x)
