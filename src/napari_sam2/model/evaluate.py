"""End-to-end quality of a model on stacks with ground truth, as a user would use it.

For every labelled object: one positive click at the most interior pixel of the
object's middle slice (the middle of its extent along the stack axis), then
propagation both ways through the whole stack with :class:`StackSession`.
Scores: the object's 3D Dice, and the Dice on each slice by distance from the
clicked slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import numpy as np

from .ensemble import open_session
from .metrics import dice
from .sam2 import SAM2Model

__all__ = ["ObjectScore", "central_pixel", "click_and_propagate", "dice", "error_shares", "score_object", "slice_table"]


@dataclass
class ObjectScore:
    obj_id: int
    click_slice: int
    click_xy: tuple
    dice_3d: float
    # distance from the clicked slice -> Dice on the slices at that distance where the object is
    per_slice: Dict[int, List[float]] = field(default_factory=dict)
    # slices where the object is absent but something was predicted
    false_slices: int = 0
    # voxel counts: predicted and right; missed; predicted beside the object on slices
    # where it is; predicted on slices where it is absent
    hit_voxels: int = 0
    missed_voxels: int = 0
    extra_voxels: int = 0
    false_slice_voxels: int = 0


def central_pixel(mask: np.ndarray) -> tuple:
    """(x, y) of the pixel farthest from the mask's edge (where a user clicks)."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(x), float(y)


def click_and_propagate(
    model: SAM2Model,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    obj_ids: Optional[Iterable[int]] = None,
    fast: bool = False,
    intensity_range=None,
    orientations: Optional[int] = None,
    stop_after_absent: Optional[int] = None,
) -> List[ObjectScore]:
    """Score every object (or ``obj_ids``) of ``labels`` (N, H, W) on ``image``.

    orientations: 1 for a plain :class:`StackSession`; 2, 4 or 8 for an
    :class:`~napari_sam2.model.ensemble.EnsembleSession` (the mean over orientations);
    default: the model profile's, as the widget and the command line start with.
    stop_after_absent: stop an object after that many slices where it is found absent
    (slices not computed count as empty).
    """
    labels = np.asarray(labels)
    if orientations is None:
        orientations = model.config.profile.orientations
    session = open_session(model, image, orientations=orientations, intensity_range=intensity_range, fast=fast)
    ids = sorted(int(i) for i in np.unique(labels) if i != 0) if obj_ids is None else [int(i) for i in obj_ids]
    scores = []
    for k in ids:
        gt = labels == k
        present = np.flatnonzero(gt.any(axis=(1, 2)))
        if len(present) == 0:
            continue
        mid = (present[0] + present[-1]) / 2
        z = int(present[np.argmin(np.abs(present - mid))])
        xy = central_pixel(gt[z])
        session.reset()
        session.add_points(z, 1, points=[xy], labels=[1])
        pred = np.zeros_like(gt)
        for t, masks in session.propagate("both", start=z, stop_after_absent=stop_after_absent):
            pred[t] = masks[1]
        scores.append(score_object(k, z, xy, pred, gt))
    return scores


def score_object(obj_id: int, click_slice: int, click_xy: tuple, pred: np.ndarray, gt: np.ndarray) -> ObjectScore:
    """Score one object's predicted (N, H, W) boolean masks against its ground truth."""
    present = gt.any(axis=(1, 2))
    score = ObjectScore(
        obj_id, click_slice, click_xy, dice(pred, gt),
        hit_voxels=int((pred & gt).sum()),
        missed_voxels=int((gt & ~pred).sum()),
        extra_voxels=int((pred & ~gt)[present].sum()),
        false_slice_voxels=int(pred[~present].sum()),
    )
    for t in range(len(gt)):
        if present[t]:
            score.per_slice.setdefault(abs(t - click_slice), []).append(dice(pred[t], gt[t]))
        elif pred[t].any():
            score.false_slices += 1
    return score


def error_shares(scores: Iterable[ObjectScore]) -> Dict[str, float]:
    """Where the wrong voxels are, pooled over objects: shares of all wrong voxels that
    were missed, predicted beside the object, or predicted on slices without it."""
    scores = list(scores)
    wrong = {
        "missed": sum(s.missed_voxels for s in scores),
        "beside": sum(s.extra_voxels for s in scores),
        "absent slices": sum(s.false_slice_voxels for s in scores),
    }
    total = sum(wrong.values())
    return {k: (v / total if total else 0.0) for k, v in wrong.items()}


def slice_table(scores: Iterable[ObjectScore], max_distance: int = 16) -> List[tuple]:
    """(distance from the click, mean Dice, number of slices) rows, pooled over objects."""
    pooled: Dict[int, List[float]] = {}
    for s in scores:
        for d, values in s.per_slice.items():
            pooled.setdefault(min(d, max_distance), []).extend(values)
    return [(d, float(np.mean(v)), len(v)) for d, v in sorted(pooled.items())]
