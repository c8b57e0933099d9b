"""Prompts simulated from ground-truth masks: clicks sampled from a mask, central clicks, noisy boxes, corrective clicks from the error region."""

from __future__ import annotations

import torch

from ..model.tracking import (
    PointPrompt,
)

# ---------------------------------------------------------------------- prompts


def _pick_pixels(weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One flat pixel index per row, drawn with the given non-negative weights."""
    w = weights.flatten(1).float()
    empty = w.sum(1) == 0
    if empty.any():
        w = w.clone()
        w[empty] = 1.0
    return torch.multinomial(w, 1, generator=gen)[:, 0]


def _xy(idx: torch.Tensor, side: int) -> torch.Tensor:
    return torch.stack([idx % side, idx // side], dim=-1).float()[:, None]  # B 1 2


def click_from_mask(gt: torch.Tensor, gen: torch.Generator) -> PointPrompt:
    """One positive click drawn uniformly inside each B S S mask."""
    idx = _pick_pixels(gt, gen)
    return PointPrompt(_xy(idx, gt.shape[-1]), torch.ones(gt.shape[0], 1, dtype=torch.int32))


def central_click(gt: torch.Tensor) -> PointPrompt:
    """One positive click per B S S mask at its most interior pixel (where a user clicks)."""
    from ..model.evaluate import central_pixel

    xy = [central_pixel(m) for m in gt.cpu().numpy()]
    return PointPrompt(torch.tensor(xy, dtype=torch.float32)[:, None], torch.ones(len(xy), 1, dtype=torch.int32))


def noisy_box(gt: torch.Tensor, gen: torch.Generator, jitter: float = 0.1) -> PointPrompt:
    """The bounding box of each B S S mask, each side moved by up to ``jitter`` of its size."""
    side = gt.shape[-1]
    rows, cols = gt.any(-1), gt.any(-2)  # B S
    ar = torch.arange(side, dtype=torch.float32)
    big = float(side)
    y0 = torch.where(rows, ar, big).amin(1)
    y1 = torch.where(rows, ar, -1.0).amax(1)
    x0 = torch.where(cols, ar, big).amin(1)
    x1 = torch.where(cols, ar, -1.0).amax(1)
    box = torch.stack([x0, y0, x1, y1], 1)
    size = torch.stack([x1 - x0, y1 - y0, x1 - x0, y1 - y0], 1) + 1
    noise = (torch.rand(box.shape, generator=gen) * 2 - 1) * jitter * size
    box = (box + noise).clamp(0, side - 1)
    lo, hi = torch.minimum(box[:, :2], box[:, 2:]), torch.maximum(box[:, :2], box[:, 2:])
    coords = torch.stack([lo, hi], 1)  # B 2 2
    labels = torch.tensor([[2, 3]], dtype=torch.int32).expand(gt.shape[0], -1)
    return PointPrompt(coords, labels.contiguous())


def correction_click(logits: torch.Tensor, gt: torch.Tensor, gen: torch.Generator) -> PointPrompt:
    """A click in each object's error region: positive where the mask is missing,
    negative where it overflows (a positive inside the object when there is no error)."""
    pred = logits[:, 0] > 0
    err = pred ^ gt
    w = torch.where(err.flatten(1).any(1)[:, None, None], err, gt)
    idx = _pick_pixels(w, gen)
    lab = gt.flatten(1).gather(1, idx[:, None]).int()
    return PointPrompt(_xy(idx, gt.shape[-1]), lab)


