"""Automatic masks on a 2D image: a grid of point prompts, filtered and de-duplicated.

The semantics and defaults of Meta's ``SAM2AutomaticMaskGenerator``: a grid of
``points_per_side``² single-point prompts (optionally again on crops of the image),
decoded in batches on one cached embedding with three masks per point; masks are
kept when the model's predicted IoU exceeds ``pred_iou_thresh`` and their *stability*
(the IoU of the mask thresholded at ±``stability_score_offset`` around
``mask_threshold``) reaches ``stability_score_thresh``; box non-maximum suppression
removes duplicates. Pure torch: the NMS is written here (no torchvision).

Differences that do not change results: masks are upsampled only after the
predicted-IoU filter, and kept as crops of their bounding boxes, not run lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .predictor import ImagePredictor
from .preprocess import InputError, check_image, check_range, default_intensity_range


@dataclass(frozen=True)
class AutoMaskParams:
    """The generator's parameters (Meta's names and defaults)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    multimask_output: bool = True

    def __post_init__(self) -> None:
        if int(self.points_per_side) < 1 or int(self.points_per_batch) < 1:
            raise InputError("points_per_side and points_per_batch must be at least 1")
        if int(self.crop_n_layers) < 0 or int(self.crop_n_points_downscale_factor) < 1:
            raise InputError("crop_n_layers must be >= 0 and crop_n_points_downscale_factor >= 1")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise InputError(f"{name} must be between 0 and 1, got {getattr(self, name)}")


PARAM_NAMES = tuple(f.name for f in fields(AutoMaskParams))


@dataclass
class AutoMask:
    """One automatic mask: its bounding box (x0, y0, x1, y1, pixel indices, inclusive as in
    Meta's generator), the mask inside that box, and how it was found."""

    box: Tuple[int, int, int, int]
    crop: np.ndarray  # bool, rows y0..y1, columns x0..x1
    predicted_iou: float
    stability_score: float
    point: Tuple[float, float]  # the (x, y) prompt that produced it
    crop_box: Tuple[int, int, int, int]  # the image crop it was found in (x0, y0, x1, y1), exclusive end

    @property
    def area(self) -> int:
        return int(self.crop.sum())

    def mask(self, hw: Tuple[int, int]) -> np.ndarray:
        """The mask as an H x W boolean image."""
        out = np.zeros(hw, bool)
        x0, y0, x1, y1 = self.box
        out[y0:y1 + 1, x0:x1 + 1] = self.crop
        return out


# ---------------------------------------------------------------------- building blocks


def point_grid(n_per_side: int) -> np.ndarray:
    """n² points (x, y) in [0, 1], at the centres of an n x n grid of cells, x fastest."""
    c = (np.arange(n_per_side) + 0.5) / n_per_side
    xs, ys = np.meshgrid(c, c)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def crop_boxes(hw: Tuple[int, int], n_layers: int, overlap_ratio: float) -> List[Tuple[Tuple[int, int, int, int], int]]:
    """The whole image, then for layer i = 1..n_layers a (2^i)² grid of overlapping crops:
    [((x0, y0, x1, y1), layer)]."""
    h, w = hw
    out = [((0, 0, w, h), 0)]
    for layer in range(1, n_layers + 1):
        n = 2 ** layer
        overlap = int(overlap_ratio * min(h, w) * (2 / n))
        cw = math.ceil((overlap * (n - 1) + w) / n)
        ch = math.ceil((overlap * (n - 1) + h) / n)
        for x0 in [int((cw - overlap) * i) for i in range(n)]:
            for y0 in [int((ch - overlap) * i) for i in range(n)]:
                out.append(((x0, y0, min(x0 + cw, w), min(y0 + ch, h)), layer))
    return out


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks at threshold + offset and threshold - offset (the first lies
    inside the second, so the IoU is the ratio of their areas)."""
    inner = (logits > threshold + offset).flatten(-2).sum(-1, dtype=torch.int64)
    outer = (logits > threshold - offset).flatten(-2).sum(-1, dtype=torch.int64)
    return inner.float() / outer.float()


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """N x H x W booleans -> N x 4 (x0, y0, x1, y1) of the set pixels, inclusive; an
    empty mask gives (0, 0, 0, 0)."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=masks.device)
    rows, cols = masks.any(-1), masks.any(-2)
    ar_h, ar_w = torch.arange(h, device=masks.device), torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(-1).values
    y1 = torch.where(rows, ar_h, -1).max(-1).values
    x0 = torch.where(cols, ar_w, w).min(-1).values
    x1 = torch.where(cols, ar_w, -1).max(-1).values
    boxes = torch.stack([x0, y0, x1, y1], -1)
    return torch.where(rows.any(-1, keepdim=True), boxes, torch.zeros_like(boxes))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of boxes (x0, y0, x1, y1); areas are (x1 - x0) * (y1 - y0)."""
    a, b = a.float(), b.float()
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the boxes kept, highest score first; a
    box is dropped when its IoU with a kept, higher-scoring box exceeds ``iou_threshold``."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])
    n = order.numel()
    removed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        removed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def remove_small_regions(logits: torch.Tensor, max_area: int, threshold: float) -> torch.Tensor:
    """Holes (background regions) and sprinkles (foreground regions) of at most
    ``max_area`` pixels flipped, one H x W logit map at a time (8-connected), as Meta's
    predictor does with ``max_hole_area`` / ``max_sprinkle_area``."""
    from skimage.measure import label

    out = logits.clone()
    for i in range(out.shape[0]):
        m = out[i].cpu().numpy()
        for inside, value in ((m <= threshold, threshold + 10.0), (m > threshold, threshold - 10.0)):
            lab = label(inside, connectivity=2)
            if lab.max() == 0:
                continue
            sizes = np.bincount(lab.ravel())
            small = sizes <= max_area
            small[0] = False
            flip = small[lab]
            if flip.any():
                m = np.where(flip, value, m)
        out[i] = torch.from_numpy(np.asarray(m, np.float32))
    return out


# ---------------------------------------------------------------------- the generator


class AutomaticMaskGenerator:
    """Every object of a 2D image, from a grid of point prompts (see the module's doc).

    model: a loaded SAM2Model; fast: bfloat16 (see :class:`ImagePredictor`); keyword
    arguments: the fields of :class:`AutoMaskParams` (Meta's names and defaults).
    """

    def __init__(self, model, *, fast: bool = False, **params) -> None:
        unknown = set(params) - set(PARAM_NAMES)
        if unknown:
            raise InputError(f"unknown parameter(s) {sorted(unknown)}; known: {', '.join(PARAM_NAMES)}")
        self.params = AutoMaskParams(**params)
        self.predictor = ImagePredictor(model, fast=fast, mask_threshold=self.params.mask_threshold)
        p = self.params
        self.grids = [point_grid(int(p.points_per_side / p.crop_n_points_downscale_factor ** i))
                      for i in range(p.crop_n_layers + 1)]
        self._held: Optional[tuple] = None  # (image, intensity range, crop) whose embedding the predictor holds

    @torch.inference_mode()
    def generate(self, image, intensity_range: Optional[Sequence[float]] = None, *,
                 should_stop: Optional[Callable[[], bool]] = None) -> List[AutoMask]:
        """The masks of ``image`` (H x W grey or H x W x 3), highest-ranked first.

        intensity_range: (low, high) mapped to black and white (default as
        :meth:`ImagePredictor.set_image`: 0..255 for uint8, else the model profile's percentiles;
        the same mapping is used for every crop). should_stop() is asked between
        batches; when it says True the masks found so far are returned.
        """
        arr = check_image(image)
        rng = self.intensity_mapping(arr, intensity_range)
        hw = arr.shape[:2]
        p = self.params
        boxes = crop_boxes(hw, p.crop_n_layers, p.crop_overlap_ratio)
        found: List[AutoMask] = []
        for crop_box, layer in boxes:
            found += self._crop(arr, rng, crop_box, layer, hw, should_stop)
            if should_stop is not None and should_stop():
                break
        if len(boxes) > 1 and found:
            cb = torch.tensor([m.crop_box for m in found], dtype=torch.float32)
            scores = 1.0 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            keep = nms(torch.tensor([m.box for m in found], dtype=torch.float32), scores, p.crop_nms_thresh)
            found = [found[i] for i in keep.tolist()]
        return found

    def intensity_mapping(self, image, intensity_range: Optional[Sequence[float]] = None) -> Tuple[float, float]:
        """The (low, high) mapped to black and white for ``image``: the one given, else the
        default (:meth:`generate`)."""
        return check_range(intensity_range) or default_intensity_range(
            check_image(image), self.predictor.model.config.profile.percentiles)

    def masks_at_points(self, image, points_xy, intensity_range: Optional[Sequence[float]] = None) -> List[AutoMask]:
        """One mask per single-click prompt (x, y pixels of ``image``): of the three masks the
        decoder gives for a click, the one with the highest predicted IoU (what a click gives
        in the tracker). Reuses the embedding when ``image`` is the one :meth:`generate` just
        saw whole (no crops); the masks come with their stability scores, unfiltered."""
        arr = check_image(image)
        rng = self.intensity_mapping(arr, intensity_range)
        hw = arr.shape[:2]
        full = (0, 0, hw[1], hw[0])
        held = self._held
        if held is None or held[0] is not arr or held[1:] != (rng, full) or not self.predictor.is_image_set:
            self.predictor.set_image(arr, rng)
            self._held = (arr, rng, full)
        pts = torch.as_tensor(np.asarray(points_xy, np.float32).reshape(-1, 2))
        out: List[AutoMask] = []
        p = self.params
        for start in range(0, pts.shape[0], p.points_per_batch):
            chunk = pts[start:start + p.points_per_batch]
            low, iou = self.predictor.predict_batch(chunk[:, None, :], torch.ones(chunk.shape[0], 1, dtype=torch.int32),
                                                    multimask_output=True)
            best = iou.argmax(1)
            rows = torch.arange(low.shape[0])
            logits = self.predictor.to_image_size(low[rows, best][:, None])[:, 0]
            stab = stability_score(logits, p.mask_threshold, p.stability_score_offset)
            masks = logits > p.mask_threshold
            boxes = mask_boxes(masks)
            for j in range(masks.shape[0]):
                bx0, by0, bx1, by1 = boxes[j].tolist()
                out.append(AutoMask((bx0, by0, bx1, by1), masks[j, by0:by1 + 1, bx0:bx1 + 1].cpu().numpy(),
                                    float(iou[j, best[j]]), float(stab[j]), (float(chunk[j, 0]), float(chunk[j, 1])), full))
        return out

    def _crop(self, arr, rng, crop_box, layer, hw, should_stop) -> List[AutoMask]:
        p = self.params
        x0, y0, x1, y1 = crop_box
        sub = arr[y0:y1, x0:x1]
        self.predictor.set_image(sub, rng)
        self._held = (arr, rng, tuple(crop_box))  # the array itself: an id could be reused
        ch, cw = sub.shape[:2]
        points = torch.from_numpy((self.grids[layer] * np.array([[cw, ch]])).astype(np.float32))
        kept_boxes, kept_scores, items = [], [], []
        for start in range(0, points.shape[0], p.points_per_batch):
            if should_stop is not None and should_stop():
                break
            pts = points[start:start + p.points_per_batch]
            low, iou = self.predictor.predict_batch(pts[:, None, :], torch.ones(pts.shape[0], 1, dtype=torch.int32),
                                                    multimask_output=p.multimask_output)
            pts_rep = pts.repeat_interleave(low.shape[1], dim=0)
            low, iou = low.flatten(0, 1), iou.flatten(0, 1)
            ok = iou > p.pred_iou_thresh if p.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
            if not ok.any():
                continue
            # upsampled only when the predicted IoU passes (the same masks, less work)
            logits = self.predictor.to_image_size(low[ok][:, None])[:, 0]
            iou, pts_rep = iou[ok], pts_rep[ok]
            if p.min_mask_region_area > 0:
                logits = remove_small_regions(logits, p.min_mask_region_area, p.mask_threshold)
            stab = stability_score(logits, p.mask_threshold, p.stability_score_offset)
            ok = stab >= p.stability_score_thresh if p.stability_score_thresh > 0 else torch.ones_like(stab, dtype=torch.bool)
            masks = logits[ok] > p.mask_threshold
            iou, stab, pts_rep = iou[ok], stab[ok], pts_rep[ok]
            bx = mask_boxes(masks)
            keep = ~self._near_crop_edge(bx, crop_box, hw)
            for j in torch.nonzero(keep).flatten().tolist():
                bx0, by0, bx1, by1 = bx[j].tolist()
                items.append((masks[j, by0:by1 + 1, bx0:bx1 + 1].cpu().numpy(), float(iou[j]), float(stab[j]),
                              (float(pts_rep[j, 0]) + x0, float(pts_rep[j, 1]) + y0)))
                kept_boxes.append(bx[j])
                kept_scores.append(iou[j])
        if not items:
            return []
        local = torch.stack(kept_boxes)
        keep = nms(local, torch.stack(kept_scores), p.box_nms_thresh)
        out = []
        for i in keep.tolist():
            bx0, by0, bx1, by1 = local[i].tolist()
            crop, piou, stab, point = items[i]
            out.append(AutoMask((bx0 + x0, by0 + y0, bx1 + x0, by1 + y0), crop, piou, stab, point, tuple(crop_box)))
        return out

    @staticmethod
    def _near_crop_edge(boxes: torch.Tensor, crop_box, hw, atol: float = 20.0) -> torch.Tensor:
        """Masks touching a crop's inner edges (not the image's) are cut by the crop: dropped."""
        x0, y0, _, _ = crop_box
        h, w = hw
        full = boxes.float() + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        near_crop = (full - torch.tensor(crop_box, dtype=torch.float32)).abs() <= atol
        near_image = (full - torch.tensor([0, 0, w, h], dtype=torch.float32)).abs() <= atol
        return (near_crop & ~near_image).any(-1)


def masks_to_labels(masks: Sequence[AutoMask], hw: Tuple[int, int], *, dtype=np.uint32) -> np.ndarray:
    """One label image from automatic masks: larger masks first, so that a smaller mask
    lying on a larger one stays visible; labels 1, 2, ... in the masks' order."""
    out = np.zeros(hw, dtype)
    order = sorted(range(len(masks)), key=lambda i: -masks[i].area)
    for i in order:
        m = masks[i]
        x0, y0, x1, y1 = m.box
        out[y0:y1 + 1, x0:x1 + 1][m.crop] = i + 1
    return out
