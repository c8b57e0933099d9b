"""Attention layers: SAM's two-way transformer and rotary (RoPE) attention."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, apply_rope, axial_rope_angles


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention, ... N C.

    On the CPU in bfloat16, PyTorch's fused kernel is no faster than in float32,
    while plain bfloat16 matrix products are (AVX-512 BF16 / AMX): measured on
    this project's CPUs, queries x keys, softmax, x values is 1.1-5x faster for
    every attention shape of SAM 2. Queries are processed in chunks so that the
    score matrix stays small (the memory attention has ~29k keys).
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout_p == 0.0:
        scale = q.shape[-1] ** -0.5
        kt = k.transpose(-1, -2)
        nq, nk = q.shape[-2], k.shape[-2]
        if nq * nk <= 2**22:
            return torch.matmul(torch.softmax(torch.matmul(q * scale, kt), dim=-1), v)
        kt = kt.contiguous()
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        chunk = 512
        for i in range(0, nq, chunk):
            scores = torch.matmul(q[..., i : i + chunk, :] * scale, kt)
            out[..., i : i + chunk, :] = torch.matmul(torch.softmax(scores, dim=-1), v)
        return out
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head attention with an optional down-projected inner width.

    q: B Nq C, k and v: B Nk kv_in_dim -> B Nq C.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        *,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.num_heads = num_heads
        self.dropout_p = dropout
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # B N C -> B nH N C/nH
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        if torch.is_autocast_enabled(q.device.type):  # autocast does not reach our matmul path
            dt = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        out = attention(q, k, v, dropout_p=p)  # B nH Nq Ch
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        cache: Optional[dict] = None,
        cache_as: Tuple[Optional[str], Optional[str], Optional[str]] = (None, None, None),
    ) -> torch.Tensor:
        """Attend; projections named in ``cache_as`` are read from / stored in ``cache``.

        Used for projections that depend only on the image (not on the prompt),
        so that repeated prompts on one image skip them.
        """
        projected = []
        for x, proj, name in zip((q, k, v), (self.q_proj, self.k_proj, self.v_proj), cache_as):
            if cache is not None and name is not None:
                hit = cache.get(name)
                if hit is None:  # image-only: every row of the batch is the same image
                    hit = cache[name] = self._heads(proj(x[:1]))
                if hit.shape[0] != x.shape[0]:
                    hit = hit.expand(x.shape[0], -1, -1, -1)
                projected.append(hit)
            else:
                projected.append(self._heads(proj(x)))
        return self._attend(*projected)


class RoPEAttention(Attention):
    """Attention with 2D axial rotary encoding of queries and keys.

    Queries are a square grid of tokens (row-major). Keys are ``r`` stacked
    copies of such a grid (memories of r frames) when ``rope_k_repeat``,
    followed by ``num_k_exclude_rope`` tokens (object pointers) left unrotated.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        *,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        feat_sizes: Tuple[int, int] = (64, 64),
        **kwargs,
    ) -> None:
        super().__init__(embedding_dim, num_heads, **kwargs)
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        self._rope_cache: dict = {}

    def rope(self, n: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the rotary position angles of ``n`` queries on a square grid (cached)."""
        key = (n, device)
        if key not in self._rope_cache:
            side = int(math.isqrt(n))
            if side * side != n:
                raise ValueError(f"RoPE attention needs a square grid of queries, got {n} tokens")
            angles = axial_rope_angles(self.internal_dim // self.num_heads, side, side, self.rope_theta)
            self._rope_cache[key] = (angles.cos().to(device), angles.sin().to(device))
        return self._rope_cache[key]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0
    ) -> torch.Tensor:
        q = self._heads(self.q_proj(q))  # B nH Nq Ch
        k = self._heads(self.k_proj(k))  # B nH Nk Ch
        v = self._heads(self.v_proj(v))
        nq = q.shape[-2]
        cos, sin = self.rope(nq, q.device)
        q = apply_rope(q, cos, sin)
        n_rope = k.shape[-2] - num_k_exclude_rope
        if n_rope > 0:
            if n_rope != nq:
                if not self.rope_k_repeat or n_rope % nq:
                    raise ValueError("keys must repeat the query grid for RoPE")
                reps = n_rope // nq
                cos_k, sin_k = cos.repeat(reps, 1), sin.repeat(reps, 1)
            else:
                cos_k, sin_k = cos, sin
            k_rot = apply_rope(k[:, :, :n_rope], cos_k, sin_k)
            k = torch.cat([k_rot, k[:, :, n_rope:]], dim=2) if num_k_exclude_rope else k_rot
        return self._attend(q, k, v)


class TwoWayAttentionBlock(nn.Module):
    """Tokens attend to themselves and the image, then the image attends to tokens."""

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, 2, activation=nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe, cache: Optional[dict] = None):
        """queries B N C, keys B hw C. ``cache`` (first layer only) keeps the
        image-side projections, which do not depend on the prompt."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        q = queries + query_pe
        queries = self.norm2(
            queries + self.cross_attn_token_to_image(q, k, keys, cache=cache, cache_as=(None, "t2i_k", "t2i_v"))
        )
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, cache=cache, cache_as=("i2t_q", None, None)))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's decoder transformer.

    image: B C h w, image_pe: B C h w, tokens: B N C
    -> (tokens B N C, image tokens B hw C).
    """

    def __init__(self, *, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor, cache: Optional[dict] = None):
        """``cache``: a dict owned by the caller for one image and one dense
        prompt (e.g. "no mask"); it must be emptied when either changes."""
        keys = image.flatten(2).transpose(1, 2)  # B hw C
        key_pe = image_pe.flatten(2).transpose(1, 2)  # B hw C
        queries = tokens
        for i, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, tokens, key_pe, cache=cache if i == 0 else None)
        q = queries + tokens
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
