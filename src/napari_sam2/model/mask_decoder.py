"""SAM 2 mask decoder with IoU and object-score heads and high-res skip features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


@dataclass
class DecoderOutput:
    """Raw decoder output for a batch of B prompts.

    masks: B M 4h 4w logits (M = 3 with multimask, else 1);
    iou: B M predicted IoU; tokens: B M C (the SAM output token of each mask,
    used for object pointers); object_score: B 1 logit that the object is present.
    """

    masks: torch.Tensor
    iou: torch.Tensor
    tokens: torch.Tensor
    object_score: torch.Tensor


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = True,
        iou_prediction_use_sigmoid: bool = True,
        pred_obj_scores: bool = True,
        pred_obj_scores_mlp: bool = True,
        use_multimask_token_for_obj_ptr: bool = True,
        dynamic_multimask_via_stability: bool = True,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ) -> None:
        super().__init__()
        c = transformer_dim
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, c)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        # single-mask requests fall back to the best multimask output when the
        # single mask is unstable (the reference's default post-processing)
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.stability_delta = dynamic_multimask_stability_delta
        self.stability_thresh = dynamic_multimask_stability_thresh
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(c, c // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(c, c // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(c, c, c // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            c, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
        )
        if pred_obj_scores:
            self.pred_obj_score_head = MLP(c, c, 1, 3) if pred_obj_scores_mlp else nn.Linear(c, 1)

    def forward(
        self,
        *,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: Optional[List[torch.Tensor]] = None,
        cache: Optional[dict] = None,
    ) -> DecoderOutput:
        """Predict masks.

        image_embeddings: B C h w (or 1 C h w with repeat_image), image_pe: 1 C h w,
        sparse: B N C, dense: B C h w, high_res_features: [B C/8 4h 4w, B C/4 2h 2w].
        """
        b = sparse_prompt_embeddings.shape[0]
        parts = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            parts.insert(0, self.obj_score_token.weight)
        s = 1 if self.pred_obj_scores else 0
        output_tokens = torch.cat(parts, dim=0).unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)  # B T C

        src = torch.repeat_interleave(image_embeddings, b, dim=0) if repeat_image else image_embeddings
        src = src + dense_prompt_embeddings
        pos = torch.repeat_interleave(image_pe, b, dim=0)
        _, c, h, w = src.shape

        hs, src = self.transformer(src, pos, tokens, cache=cache)  # B T C, B hw C
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1 : s + 1 + self.num_mask_tokens, :]  # B 4 C

        src = src.transpose(1, 2).reshape(b, c, h, w)
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        if self.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this decoder needs the two high-resolution feature maps")
            feat_s0, feat_s1 = high_res_features
            up = act1(ln1(dc1(src) + feat_s1))
            up = act2(dc2(up) + feat_s0)  # B C/8 4h 4w
        else:
            up = act2(dc2(act1(ln1(dc1(src)))))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # B 4 C/8
        bu, cu, hu, wu = up.shape
        masks = (hyper_in @ up.reshape(bu, cu, hu * wu)).reshape(bu, -1, hu, wu)  # B 4 4h 4w
        iou = self.iou_prediction_head(iou_token_out)  # B 4
        if self.pred_obj_scores:
            object_score = self.pred_obj_score_head(hs[:, 0, :])
        else:
            object_score = 10.0 * iou.new_ones(iou.shape[0], 1)

        if multimask_output:
            masks, iou = masks[:, 1:], iou[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou = self._stable_single_mask(masks, iou)
        else:
            masks, iou = masks[:, 0:1], iou[:, 0:1]
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            out_tokens = mask_tokens_out[:, 1:]
        else:
            out_tokens = mask_tokens_out[:, 0:1]
        return DecoderOutput(masks=masks, iou=iou, tokens=out_tokens, object_score=object_score)

    def _stable_single_mask(self, masks: torch.Tensor, iou: torch.Tensor):
        """Token 0's mask where it is stable, else the multimask output of highest IoU.

        masks: B 4 H W, iou: B 4 -> B 1 H W, B 1.
        """
        multi, multi_iou = masks[:, 1:], iou[:, 1:]
        best = multi_iou.argmax(dim=-1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        best_masks = multi[rows, best].unsqueeze(1)
        best_iou = multi_iou[rows, best].unsqueeze(1)
        single, single_iou = masks[:, 0:1], iou[:, 0:1]
        flat = single.flatten(-2)
        inter = (flat > self.stability_delta).sum(-1).float()
        union = (flat > -self.stability_delta).sum(-1).float()
        stability = torch.where(union > 0, inter / union, torch.ones_like(inter))  # B 1
        stable = stability >= self.stability_thresh
        out_masks = torch.where(stable[..., None, None], single, best_masks)
        out_iou = torch.where(stable, single_iou, best_iou)
        return out_masks, out_iou
