"""The one check of clicks, boxes and mask prompts, for the image predictor and the sessions.

Prompts are given in (x, y) pixels of the image or slice (x the column, y the row,
pixel centres at integers); :mod:`~napari_sam2.model.geometry` maps the checked
coordinates onto the model's input.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .geometry import xy_to_model
from .preprocess import InputError, check_xy

__all__ = ["BOX_LABELS", "check_mask", "check_prompts", "slice_prompt"]

#: point labels of a box's two corners (top-left, bottom-right), as SAM encodes them
BOX_LABELS = (2, 3)


def check_prompts(
    points, labels, box, hw: Tuple[int, int], *, where: str = "image", batch: bool = True
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Check clicks and boxes on an H x W image (``hw``); returns (B x P x 2 float32 (x, y)
    pixel coordinates, B x P int32 labels) with each box's corners first (labels 2, 3),
    then its clicks (1 positive, 0 negative); (None, None) when no prompt is given.

    points: N x 2 (x, y), or B x N x 2 for B objects; labels: N (or B x N) of 1 / 0;
    box: (x0, y0, x1, y1), or B x 4 for B objects (one click set serves all boxes or
    there is one per box). batch=False: one object (B = 1), as a session takes it;
    labels may then have any shape with one entry per point. ``where`` names the
    image in messages ("image", "slice"). Raises :class:`InputError` saying what is wrong.
    """
    if (points is None) != (labels is None):
        raise InputError("points and labels must be given together (labels: 1 positive, 0 negative)")
    coords, labs = None, None
    if points is not None:
        pts = np.asarray(points, dtype=np.float32)
        lab = np.asarray(labels)
        if pts.ndim == 2:
            pts = pts[None]
        if not batch:
            lab = lab.reshape(1, -1)
        elif lab.ndim == 1:
            lab = lab[None]
        if pts.ndim != 3 or pts.shape[-1] != 2 or (not batch and pts.shape[0] != 1):
            raise InputError(f"points must have shape (N, 2) as (x, y) pairs, got {np.shape(points)}")
        if lab.shape != pts.shape[:2]:
            raise InputError(
                f"labels must have one entry per point: {pts.shape[1]} points but labels of shape {np.shape(labels)}"
            )
        if not np.isin(lab, (0, 1)).all():
            raise InputError("labels must be 1 (positive) or 0 (negative)")
        check_xy(pts, hw, "points", where)
        coords, labs = pts, lab.astype(np.int32)
    if box is not None:
        bx = np.asarray(box, dtype=np.float32)
        if bx.ndim == 1:
            bx = bx[None]
        if bx.ndim != 2 or bx.shape[-1] != 4 or (not batch and len(bx) != 1):
            allowed = "(x0, y0, x1, y1) or an (N, 4) array of boxes" if batch else "(x0, y0, x1, y1)"
            raise InputError(f"box must be {allowed}, got shape {np.shape(box)}")
        corners = bx.reshape(-1, 2, 2)  # B 2 2: (x0, y0), (x1, y1)
        check_xy(corners, hw, "box", where)
        if (corners[:, 1] < corners[:, 0]).any():
            raise InputError("box must be given as (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
        blabels = np.tile(np.array([BOX_LABELS], dtype=np.int32), (len(bx), 1))
        if coords is not None:
            if coords.shape[0] not in (1, len(bx)):
                raise InputError(f"{coords.shape[0]} point sets do not match {len(bx)} boxes")
            coords = np.broadcast_to(coords, (len(bx),) + coords.shape[1:])
            labs = np.broadcast_to(labs, (len(bx),) + labs.shape[1:])
            coords = np.concatenate([corners, coords], axis=1)
            labs = np.concatenate([blabels, labs], axis=1)
        else:
            coords, labs = corners, blabels
    return coords, labs


def slice_prompt(points, labels, box, hw: Tuple[int, int], size: int, *, clear: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """One object's clicks and box on one slice (as a session's ``add_points`` takes them)
    -> (N x 2 float32 model-input coordinates, N int32 labels), the box's corners first."""
    coords, labs = check_prompts(points, labels, box, hw, where="slice", batch=False)
    if coords is None:
        raise InputError("give points with labels, or a box")
    if box is not None and not clear:
        raise InputError("a box replaces the slice's earlier prompts: use clear=True with a box")
    return xy_to_model(coords[0], hw, size), labs[0]


def check_mask(mask, hw: Tuple[int, int]) -> np.ndarray:
    """A mask prompt must be one slice (H x W, bool or 0 / 1); returns it as numpy."""
    m = np.asarray(mask)
    if m.shape != tuple(hw):
        raise InputError(f"mask must have the slice's shape {tuple(hw)}, got {m.shape}")
    return m
