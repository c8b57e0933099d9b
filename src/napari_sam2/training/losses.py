"""Training losses on the mask decoder's outputs: focal + dice on masks (best of the multimask outputs), L1 on the predicted IoU, BCE on the object score."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ..model.sam2 import HeadsOutput
from .config import TrainConfig

# ---------------------------------------------------------------------- losses


def mask_losses(logits: torch.Tensor, gt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid focal (alpha 0.25, gamma 2, mean over pixels) and dice losses: B M each."""
    t = gt[:, None].float().expand_as(logits)
    x = logits.flatten(2)
    t = t.flatten(2)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    focal = (ce * (1 - p_t) ** 2 * (0.25 * t + 0.75 * (1 - t))).mean(-1)
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    return focal, dice


def heads_loss(heads: HeadsOutput, gt: torch.Tensor, cfg: TrainConfig) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Loss of one output for B objects; gt B S S bool. Mask and IoU terms only where
    the object is present; with several masks only the best one is trained."""
    masks = heads.high_res_multimasks.float()  # B M S S
    present = gt.flatten(1).any(1).float()
    focal, dice = mask_losses(masks, gt)
    combo = cfg.focal_weight * focal + cfg.dice_weight * dice
    best = combo.argmin(1)
    rows = torch.arange(masks.shape[0])
    mask_l = combo[rows, best]
    with torch.no_grad():
        pred = masks > 0
        g = gt[:, None]
        inter = (pred & g).flatten(2).sum(-1).float()
        union = (pred | g).flatten(2).sum(-1).float()
        true_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    iou_l = (heads.ious.float() - true_iou).abs().mean(1)
    score_l = F.binary_cross_entropy_with_logits(heads.object_score_logits[:, 0].float(), present, reduction="none")
    total = present * (mask_l + cfg.iou_weight * iou_l) + cfg.score_weight * score_l
    if cfg.absent_mask_weight:
        total = total + (1 - present) * cfg.absent_mask_weight * combo.mean(1)
    parts = {
        "focal": float((present * focal[rows, best]).detach().mean()),
        "dice": float((present * dice[rows, best]).detach().mean()),
        "iou": float((present * iou_l).detach().mean()),
        "score": float(score_l.detach().mean()),
    }
    return total.mean(), parts


