"""Mask clean-up without compiled extensions (scikit-image's connected components).

Meta's reference fills small holes with a CUDA extension and silently skips the
step without it; these functions do the same thing on any machine.
"""

from __future__ import annotations

import numpy as np
import torch


def _small_components(binary: np.ndarray, max_area: int) -> np.ndarray:
    """Pixels of 8-connected components of ``binary`` (H W) with area <= max_area."""
    from skimage.measure import label

    lab = label(binary, connectivity=2)
    if lab.max() == 0:
        return np.zeros_like(binary, dtype=bool)
    areas = np.bincount(lab.ravel())
    small = areas <= max_area
    small[0] = False
    return small[lab]


def fill_holes(logits: torch.Tensor, max_area: int, fill_value: float = 0.1) -> torch.Tensor:
    """Turn background components (logit <= 0) of at most ``max_area`` pixels into foreground.

    logits: ... H W. As in the reference, any small background component counts,
    also one touching the border; it gets the small positive score ``fill_value``.
    """
    if max_area <= 0:
        return logits
    flat = logits.reshape(-1, *logits.shape[-2:])
    bg = (flat <= 0).cpu().numpy()
    holes = np.stack([_small_components(b, max_area) for b in bg])
    if not holes.any():
        return logits
    mask = torch.from_numpy(holes).to(logits.device).reshape(logits.shape)
    return torch.where(mask, torch.as_tensor(fill_value, dtype=logits.dtype, device=logits.device), logits)


def remove_islands(logits: torch.Tensor, max_area: int, fill_value: float = -10.0) -> torch.Tensor:
    """Turn foreground components (logit > 0) of at most ``max_area`` pixels into background."""
    if max_area <= 0:
        return logits
    flat = logits.reshape(-1, *logits.shape[-2:])
    fg = (flat > 0).cpu().numpy()
    islands = np.stack([_small_components(f, max_area) for f in fg])
    if not islands.any():
        return logits
    mask = torch.from_numpy(islands).to(logits.device).reshape(logits.shape)
    return torch.where(mask, torch.as_tensor(fill_value, dtype=logits.dtype, device=logits.device), logits)


def non_overlapping(logits: torch.Tensor) -> torch.Tensor:
    """Keep, at each pixel, only the highest-scoring object (others clamped to <= -10).

    logits: B 1 H W, one row per object.
    """
    if logits.shape[0] <= 1:
        return logits
    best = logits.argmax(dim=0, keepdim=True)
    keep = best == torch.arange(logits.shape[0], device=logits.device)[:, None, None, None]
    return torch.where(keep, logits, logits.clamp(max=-10.0))


def paint_masks(labels_slice: np.ndarray, masks) -> None:
    """Paint {obj_id: H x W bool} into a label slice in place: each object's old pixels are
    cleared and it takes its mask's background pixels (other objects keep theirs)."""
    for obj_id, mask in masks.items():
        labels_slice[labels_slice == obj_id] = 0
        labels_slice[np.asarray(mask, bool) & (labels_slice == 0)] = obj_id


def write_masks(labels: np.ndarray, index, masks) -> None:
    """Paint masks into one slice of a labels array (numpy, zarr, ...): the slice is read,
    painted with :func:`paint_masks` and written back."""
    sl = np.array(labels[index])
    paint_masks(sl, masks)
    labels[index] = sl


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected part of a boolean mask (any dimension; neighbours include the
    diagonals: 26-connectivity in 3D); an empty mask stays empty."""
    from scipy import ndimage as ndi

    m = np.asarray(mask, bool)
    parts, n = ndi.label(m, structure=np.ones((3,) * m.ndim, bool))
    if n <= 1:
        return m.copy()
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    return parts == int(np.argmax(sizes))
