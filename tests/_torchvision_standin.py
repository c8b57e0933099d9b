"""A torch-only stand-in for the few torchvision pieces Meta's reference imports.

torchvision is not installed where the tests run (it does not work on these CPUs), but
the reference's automatic mask generator imports ``batched_nms`` and ``box_area`` and
its image transforms import ``Normalize``, ``Resize`` and ``ToTensor``. :func:`install`
puts small, plainly written versions into ``sys.modules`` when torchvision itself cannot
be imported. The NMS here is a brute-force loop, checked in tests/test_automatic.py
against hand-made cases.
"""

from __future__ import annotations

import sys
import types
from typing import List

import numpy as np
import torch
import torch.nn.functional as F


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou(a, b) -> float:
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS within each category, one pair at a time: indices kept, best score first."""
    b = boxes.tolist()
    s = scores.tolist()
    c = idxs.tolist()
    order = sorted(range(len(s)), key=lambda i: -s[i])
    kept: List[int] = []
    for i in order:
        if all(c[j] != c[i] or _iou(b[i], b[j]) <= iou_threshold for j in kept):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long)


class ToTensor:
    def __call__(self, pic):
        arr = np.asarray(pic)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return t.float().div(255) if t.dtype == torch.uint8 else t.float()


class Resize(torch.nn.Module):
    """Bilinear, antialiased (torchvision's behaviour on tensors)."""

    def __init__(self, size) -> None:
        super().__init__()
        self.size: List[int] = [int(size[0]), int(size[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]


class Normalize(torch.nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        self.mean: List[float] = [float(v) for v in mean]
        self.std: List[float] = [float(v) for v in std]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


def install() -> None:
    """Provide ``torchvision`` (ops.boxes, transforms) from this module unless the real one imports."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        return
    root = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    transforms = types.ModuleType("torchvision.transforms")
    boxes.batched_nms, boxes.box_area = batched_nms, box_area
    transforms.ToTensor, transforms.Resize, transforms.Normalize = ToTensor, Resize, Normalize
    root.ops, ops.boxes, root.transforms = ops, boxes, transforms
    sys.modules.update({"torchvision": root, "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
                        "torchvision.transforms": transforms})
