"""Prompt encoder: points, box corners and low-resolution masks to embeddings."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .common import LayerNorm2d, RandomPositionEncoding

# Point label codes understood by the encoder.
PAD, NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Points are B N 2 pixel coordinates (x, y) in the model's input frame
    (``input_image_size``), with B N integer labels: 1 positive, 0 negative,
    2/3 box corners, -1 padding. Masks are B 1 (4*h) (4*w) logits.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = RandomPositionEncoding(embed_dim // 2)
        # 0 negative, 1 positive, 2 box top-left, 3 box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self._dense_pe = None  # (gaussian matrix version, device, tensor)

    def dense_pe(self) -> torch.Tensor:
        """Position encoding of the image embedding grid: 1 C h w (cached)."""
        g = self.pe_layer.positional_encoding_gaussian_matrix
        key = (g._version, g.data_ptr(), g.device)
        if self._dense_pe is None or self._dense_pe[0] != key or torch.is_grad_enabled():
            pe = self.pe_layer.grid(self.image_embedding_size).unsqueeze(0)
            if torch.is_grad_enabled():
                return pe
            self._dense_pe = (key, pe)
        return self._dense_pe[1]

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """B N 2 coords, B N labels -> B N C sparse embeddings."""
        emb = self.pe_layer.points(coords + 0.5, self.input_image_size)  # pixel centres
        labels = labels.unsqueeze(-1)
        emb = torch.where(labels == PAD, self.not_a_point_embed.weight.expand_as(emb), emb)
        for code in (NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT):
            emb = torch.where(labels == code, emb + self.point_embeddings[code].weight, emb)
        return emb

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        masks: Optional[torch.Tensor],
        batch_size: int = 1,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (sparse B N C, dense B C h w) embeddings.

        Boxes are passed as two points labelled 2 and 3. A padding point is
        always appended, as SAM 2 does for every prompt it gets.
        """
        device = self.no_mask_embed.weight.device
        if points is not None:
            coords, labels = points
            batch_size = coords.shape[0]
            coords = torch.cat([coords, coords.new_zeros(batch_size, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((batch_size, 1), PAD)], dim=1)
            sparse = self.embed_points(coords, labels)
        else:
            if masks is not None:
                batch_size = masks.shape[0]
            sparse = torch.empty(batch_size, 0, self.embed_dim, device=device)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, h, w)
        return sparse, dense
