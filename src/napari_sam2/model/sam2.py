"""The SAM 2 model: its components, composed by :func:`build_model`.

:class:`SAM2Model` only holds modules and parameters (named like the
official checkpoints' keys) and runs stateless steps: image features, SAM
heads, memory encoding, memory-conditioned features. Sessions, caches and
prompts live in the predictors (``predictor.py``, ``video.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP
from .config import SAM2Config
from .hiera import Hiera
from .image_encoder import BackboneOutput, FpnNeck, ImageEncoder
from .mask_decoder import MaskDecoder
from .memory import MemoryAttention, MemoryEncoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer

NO_OBJ_SCORE = -1024.0  # logit written where the object is predicted absent
# mask logits fed back as a prompt (a correction on a slice with a result) are clamped to
# +-LOGIT_CLAMP, as the reference does; an ensemble clamps each member before averaging
LOGIT_CLAMP = 32.0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FrameFeatures:
    """Features of one or more frames, ready for the SAM heads.

    image_embed: B C h w (lowest level, without the no-memory embedding),
    high_res: [B C/8 4h 4w, B C/4 2h 2w] (already through conv_s0 / conv_s1),
    pos: position encoding of the lowest level, B C h w.
    """

    image_embed: torch.Tensor
    high_res: List[torch.Tensor]
    pos: torch.Tensor

    @property
    def nbytes(self) -> int:
        ts = [self.image_embed, self.pos, *self.high_res]
        return sum(t.numel() * t.element_size() for t in ts)


@dataclass
class HeadsOutput:
    """Output of :meth:`SAM2Model.forward_sam_heads` for B objects.

    low_res_multimasks B M 4h 4w, high_res_multimasks B M S S, ious B M,
    low_res_masks B 1 4h 4w and high_res_masks B 1 S S (the best of M),
    obj_ptr B C, object_score_logits B 1.
    """

    low_res_multimasks: torch.Tensor
    high_res_multimasks: torch.Tensor
    ious: torch.Tensor
    low_res_masks: torch.Tensor
    high_res_masks: torch.Tensor
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor


class SAM2Model(nn.Module):
    def __init__(
        self,
        *,
        config: SAM2Config,
        image_encoder: ImageEncoder,
        sam_prompt_encoder: PromptEncoder,
        sam_mask_decoder: MaskDecoder,
        memory_attention: MemoryAttention,
        memory_encoder: MemoryEncoder,
    ) -> None:
        super().__init__()
        self.config = config
        c, m = config.d_model, config.mem_dim
        self.hidden_dim, self.mem_dim = c, m
        self.image_size = config.image_size
        self.num_maskmem = config.num_maskmem
        self.image_encoder = image_encoder
        self.sam_prompt_encoder = sam_prompt_encoder
        self.sam_mask_decoder = sam_mask_decoder
        self.memory_attention = memory_attention
        self.memory_encoder = memory_encoder
        # memory-related parameters (names follow the official checkpoints)
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(config.num_maskmem, 1, 1, m))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, c))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, c))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, c))
        self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, m)) if config.no_obj_embed_spatial else None
        self.obj_ptr_proj = MLP(c, c, c, 3)
        self.obj_ptr_tpos_proj = nn.Linear(c, m) if config.proj_tpos_enc_in_obj_ptrs else nn.Identity()
        for p in (self.maskmem_tpos_enc, self.no_mem_embed, self.no_mem_pos_enc, self.no_obj_ptr):
            nn.init.trunc_normal_(p, std=0.02)
        if self.no_obj_embed_spatial is not None:
            nn.init.trunc_normal_(self.no_obj_embed_spatial, std=0.02)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    # ------------------------------------------------------------------ image path

    @torch.no_grad()
    def scale_image_embedding(self, scale: float) -> None:
        """Multiply the image embedding (the coarsest level, the sum of the neck's two
        coarsest lateral convolutions) and the no-memory embedding added to it by ``scale``."""
        for conv in list(self.image_encoder.neck.convs)[:2]:
            for prm in conv.parameters():
                prm.mul_(scale)
        self.no_mem_embed.mul_(scale)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """B 3 S S images in [0, 1] -> ImageNet-normalised model input."""
        return (images - self.pixel_mean) / self.pixel_std

    def forward_image(self, images: torch.Tensor) -> BackboneOutput:
        """B 3 S S normalised images -> backbone output, with the two finest
        levels already projected by the decoder's conv_s0 / conv_s1."""
        out = self.image_encoder(images)
        out.fpn[0] = self.sam_mask_decoder.conv_s0(out.fpn[0])
        out.fpn[1] = self.sam_mask_decoder.conv_s1(out.fpn[1])
        return out

    def frame_features(self, images: torch.Tensor) -> FrameFeatures:
        """B 3 S S normalised images -> FrameFeatures."""
        out = self.forward_image(images)
        return FrameFeatures(image_embed=out.fpn[-1], high_res=out.fpn[:-1], pos=out.pos[-1])

    def forward_sam_heads(
        self,
        backbone_features: torch.Tensor,
        *,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        mask_inputs: Optional[torch.Tensor] = None,
        high_res_features: Optional[List[torch.Tensor]] = None,
        multimask_output: bool = False,
    ) -> HeadsOutput:
        """Prompt encoder + mask decoder on B C h w features (one row per object).

        point_coords B P 2 in model-input pixels (x, y), point_labels B P;
        mask_inputs B 1 H W logits or probabilities at any size (resized to 4h x 4w).
        """
        b = backbone_features.shape[0]
        device = backbone_features.device
        if point_coords is None:
            point_coords = torch.zeros(b, 1, 2, device=device)
            point_labels = -torch.ones(b, 1, dtype=torch.int32, device=device)
        mask_prompt = None
        if mask_inputs is not None:
            target = self.sam_prompt_encoder.mask_input_size
            if tuple(mask_inputs.shape[-2:]) != tuple(target):
                mask_prompt = F.interpolate(
                    mask_inputs.float(), size=target, mode="bilinear", align_corners=False, antialias=True
                )
            else:
                mask_prompt = mask_inputs
        sparse, dense = self.sam_prompt_encoder((point_coords, point_labels), mask_prompt)
        dec = self.sam_mask_decoder(
            image_embeddings=backbone_features,
            image_pe=self.sam_prompt_encoder.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=False,
            high_res_features=high_res_features,
        )
        low_multi, ious, tokens, obj_score = dec.masks, dec.iou, dec.tokens, dec.object_score
        present = obj_score > 0  # B 1
        low_multi = torch.where(present[:, None, None], low_multi, NO_OBJ_SCORE).float()
        high_multi = F.interpolate(
            low_multi, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        token = tokens[:, 0]
        if multimask_output:
            best = ious.argmax(dim=-1)
            rows = torch.arange(b, device=device)
            low, high = low_multi[rows, best].unsqueeze(1), high_multi[rows, best].unsqueeze(1)
            if tokens.shape[1] > 1:
                token = tokens[rows, best]
        else:
            low, high = low_multi, high_multi
        obj_ptr = self.obj_ptr_proj(token)
        lam = present.float()
        obj_ptr = lam * obj_ptr + (1 - lam) * self.no_obj_ptr
        return HeadsOutput(low_multi, high_multi, ious, low, high, obj_ptr, obj_score)

    def mask_as_output(self, features: FrameFeatures, mask_inputs: torch.Tensor) -> HeadsOutput:
        """Turn a binary B 1 S S mask prompt directly into output logits (no SAM decoding),
        computing only the object pointer with the SAM heads."""
        scale, bias = 20.0, -10.0
        m = mask_inputs.float()
        high = m * scale + bias
        low = F.interpolate(
            high, size=(high.shape[-2] // 4, high.shape[-1] // 4), mode="bilinear",
            align_corners=False, antialias=True,
        )
        ious = m.new_ones(m.shape[0], 1)
        heads = self.forward_sam_heads(
            features.image_embed, mask_inputs=self.mask_downsample(m), high_res_features=features.high_res
        )
        present = (m.flatten(1) > 0).any(dim=1, keepdim=True).float()  # B 1
        obj_score = scale * present + bias
        obj_ptr = present * heads.obj_ptr + (1 - present) * self.no_obj_ptr
        return HeadsOutput(low, high, ious, low, high, obj_ptr, obj_score)


def build_model(config: SAM2Config) -> SAM2Model:
    """Build a randomly initialised SAM2Model for ``config``."""
    c = config.d_model
    trunk = Hiera(config.trunk)
    neck = FpnNeck(d_model=c, backbone_channel_list=config.trunk.channel_list, top_down_levels=config.fpn_top_down_levels)
    emb = config.embedding_size
    return SAM2Model(
        config=config,
        image_encoder=ImageEncoder(trunk=trunk, neck=neck, scalp=config.scalp),
        sam_prompt_encoder=PromptEncoder(
            embed_dim=c,
            image_embedding_size=(emb, emb),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        sam_mask_decoder=MaskDecoder(
            transformer_dim=c,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth, embedding_dim=c,
                num_heads=config.decoder_heads, mlp_dim=config.decoder_mlp_dim,
            ),
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        memory_attention=MemoryAttention(
            d_model=c, mem_dim=config.mem_dim, num_layers=config.memory_attention_layers,
            dim_feedforward=config.memory_attention_ffn_dim, num_heads=config.memory_attention_heads,
            rope_theta=config.rope_theta,
        ),
        memory_encoder=MemoryEncoder(in_dim=c, out_dim=config.mem_dim, fuser_layers=config.fuser_layers),
    ).eval()
