"""Memory encoder (mask + features -> memory) and memory attention (features x memories)."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, SinePositionEncoding
from .transformer import RoPEAttention


class MaskDownSampler(nn.Module):
    """Strided convs that bring a full-resolution mask to the embedding grid.

    B 1 S S -> B embed_dim S/16 S/16; channels grow by stride**2 at each step.
    """

    def __init__(self, *, embed_dim: int = 256, kernel_size: int = 3, stride: int = 2, padding: int = 1, total_stride: int = 16) -> None:
        super().__init__()
        num_layers = int(round(math.log(total_stride, stride)))
        layers = []
        cin = 1
        for _ in range(num_layers):
            cout = cin * stride**2
            layers += [nn.Conv2d(cin, cout, kernel_size, stride, padding), LayerNorm2d(cout), nn.GELU()]
            cin = cout
        layers.append(nn.Conv2d(cin, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 conv, LayerNorm, pointwise MLP, layer scale."""

    def __init__(self, dim: int, kernel_size: int = 7, padding: int = 3) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B C H W
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)  # B H W C
        y = self.pwconv2(self.act(self.pwconv1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Fuse frame features with a (sigmoid-scaled) mask into a memory.

    pix_feat: B C h w, masks: B 1 S S -> (features B mem_dim h w, pos B mem_dim h w).
    """

    def __init__(self, *, in_dim: int = 256, out_dim: int = 64, fuser_layers: int = 2) -> None:
        super().__init__()
        self.mask_downsampler = MaskDownSampler(embed_dim=in_dim)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(in_dim, fuser_layers)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()
        self.position_encoding = SinePositionEncoding(out_dim)

    @torch.no_grad()
    def use_mask_only(self) -> None:
        """Make memories from the mask alone: the frame features' projection is zeroed and
        frozen (a training recipe for models whose image features do not yet carry identity)."""
        for prm in self.pix_feat_proj.parameters():
            prm.zero_()
            prm.requires_grad_(False)

    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = self.out_proj(self.fuser(x))
        return x, self.position_encoding(x).to(x.dtype)


class MemoryAttentionLayer(nn.Module):
    """Self-attention (RoPE), cross-attention to memories (RoPE), FFN; pre-norm."""

    def __init__(self, *, d_model: int, mem_dim: int, dim_feedforward: int, num_heads: int, rope_theta: float, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = RoPEAttention(d_model, num_heads, rope_theta=rope_theta, dropout=dropout)
        self.cross_attn_image = RoPEAttention(
            d_model, num_heads, rope_theta=rope_theta, rope_k_repeat=True, dropout=dropout, kv_in_dim=mem_dim
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        """tgt: B N C, memory / memory_pos: B M mem_dim."""
        t = self.norm1(tgt)
        tgt = tgt + self.dropout1(self.self_attn(t, t, t))
        t = self.norm2(tgt)
        tgt = tgt + self.dropout2(
            self.cross_attn_image(t, memory + memory_pos, memory, num_k_exclude_rope=num_k_exclude_rope)
        )
        t = self.norm3(tgt)
        return tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(t)))))


class MemoryAttention(nn.Module):
    """Condition the current frame's features on the memory bank.

    curr / curr_pos: B N C (N = h*w), memory / memory_pos: B M mem_dim, where the
    last ``num_obj_ptr_tokens`` memory tokens are object pointers (no RoPE).
    Returns B N C.
    """

    def __init__(self, *, d_model: int, mem_dim: int, num_layers: int, dim_feedforward: int, num_heads: int, rope_theta: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(
                d_model=d_model, mem_dim=mem_dim, dim_feedforward=dim_feedforward,
                num_heads=num_heads, rope_theta=rope_theta,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    @torch.no_grad()
    def bias_towards_same_place(self, strength: float) -> None:
        """Start the cross-attention local: query and key biases on the fastest rotary pairs
        of each axis make a place attend most to the memory of the same place (a training
        recipe for memory attention learned from scratch)."""
        for layer in self.layers:
            att = layer.cross_attn_image
            head_dim = att.internal_dim // att.num_heads
            bias = torch.zeros(att.num_heads, head_dim // 2, 2)
            fast = min(8, head_dim // 4)  # rotary pairs: x frequencies first, then y, fastest first
            bias[:, :fast, 0] = strength
            bias[:, head_dim // 4: head_dim // 4 + fast, 0] = strength
            att.q_proj.bias.copy_(bias.flatten())
            att.k_proj.bias.copy_(bias.flatten())

    def forward(self, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens: int = 0) -> torch.Tensor:
        x = curr + 0.1 * curr_pos
        for layer in self.layers:
            x = layer(x, memory, memory_pos, num_k_exclude_rope=num_obj_ptr_tokens)
        return self.norm(x)
