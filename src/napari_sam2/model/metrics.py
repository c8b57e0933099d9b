"""Agreement between masks, computed one way for evaluation, training and benchmarks."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["dice", "dice_per_row"]


def dice_per_row(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Dice of B ... boolean masks (2D slices, 3D volumes), one float64 value per row;
    1 where both are empty. Pixels are counted exactly (int64), then divided."""
    inter = (pred & gt).flatten(1).sum(1)
    total = pred.flatten(1).sum(1) + gt.flatten(1).sum(1)
    return torch.where(total > 0, 2 * inter.double() / total.clamp(min=1).double(),
                       torch.ones(total.shape, dtype=torch.float64))


def dice(pred, gt) -> float:
    """Dice of two boolean arrays of one shape (numpy or torch); 1.0 when both are empty."""
    p = torch.as_tensor(np.asarray(pred, dtype=bool)).reshape(1, -1)
    g = torch.as_tensor(np.asarray(gt, dtype=bool)).reshape(1, -1)
    return float(dice_per_row(p, g)[0])
