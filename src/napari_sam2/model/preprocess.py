"""Turning user images (any dtype, grey or RGB) into model input."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import DEFAULT_PERCENTILES
from .errors import InputError  # defined with the other errors; imported from here too


def check_image(image, name: str = "image") -> np.ndarray:
    """Validate one 2D image: H x W or H x W x C (C = 1, 3 or 4). Returns a numpy array."""
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        pass
    elif arr.ndim != 2:
        raise InputError(
            f"{name} must be a 2D image of shape (H, W) or (H, W, 3), got shape {arr.shape}; "
            "for a stack of slices use a stack session instead"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.number)):
        raise InputError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{name} must be real-valued, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite values; replace them (e.g. np.nan_to_num) first")
    return arr


def check_xy(xy: np.ndarray, hw: Tuple[int, int], name: str, where: str = "image") -> None:
    """Coordinates ... x 2 as (x, y) pixels must be finite and inside an image of (H, W)
    (pixel centres at integers, so the edges lie at -0.5 and W - 0.5)."""
    h, w = hw
    if not np.isfinite(xy).all():
        raise InputError(f"{name} contain NaN or infinite coordinates")
    bad = (xy[..., 0] < -0.5) | (xy[..., 0] > w - 0.5) | (xy[..., 1] < -0.5) | (xy[..., 1] > h - 0.5)
    if bad.any():
        x, y = xy.reshape(-1, 2)[bad.reshape(-1)][0]
        raise InputError(
            f"{name} has a coordinate (x={x:g}, y={y:g}) outside the {where} (width {w}, height {h}); "
            "coordinates are (x, y) = (column, row) pixels"
        )


#: at most this many values go into a default intensity range (above it, every k-th is used)
MAX_RANGE_VALUES = 2**24


def default_intensity_range(arr: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                            empty: str = "the image holds no finite value (all NaN or infinite); give intensity_range",
                            ) -> Tuple[float, float]:
    """The mapping used when none is given, one policy for images and stacks: uint8 data uses
    (0, 255); anything else the ``percentiles`` of its finite values (min and max where they
    coincide), from a regular sample of :data:`MAX_RANGE_VALUES` values on larger data."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return 0.0, 255.0
    flat = arr.reshape(-1)
    if flat.size > MAX_RANGE_VALUES:  # a regular sample bounds the time and memory on huge frames
        flat = flat[:: -(-flat.size // MAX_RANGE_VALUES)]
    values = flat.astype(np.float64)
    if not np.issubdtype(arr.dtype, np.integer):
        values = values[np.isfinite(values)]
    return percentile_range(values, percentiles, empty)


def percentile_range(values: np.ndarray, percentiles: Sequence[float], empty: str) -> Tuple[float, float]:
    """(low, high) percentiles of ``values`` (finite numbers), or their min and max when the
    percentiles coincide; ``empty``: the error's message when there are no values."""
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        raise InputError(empty)
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        lo, hi = values.min(), values.max()
    return float(lo), float(hi)


def check_range(intensity_range: Optional[Sequence[float]]) -> Optional[Tuple[float, float]]:
    if intensity_range is None:
        return None
    try:
        lo, hi = (float(v) for v in intensity_range)
    except (TypeError, ValueError):
        raise InputError(f"intensity_range must be two numbers (low, high), got {intensity_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
        raise InputError(f"intensity_range must be finite with low <= high, got {(lo, hi)}")
    return lo, hi


def to_unit_rgb(arr: np.ndarray, intensity_range: Tuple[float, float]) -> torch.Tensor:
    """H W or H W C numbers -> 3 H W float32 in [0, 1], mapped linearly from the range.

    A uint8 image with range (0, 255) becomes exactly ``arr / 255``, as the
    reference does. Grey images are repeated over the three channels.
    """
    lo, hi = intensity_range
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # memmaps and TIFF pages: torch wants writable memory
        arr = arr.copy()
    t = torch.from_numpy(arr)
    if t.ndim == 2:
        t = t.unsqueeze(-1)
    t = t[..., :3] if t.shape[-1] >= 3 else t[..., :1].expand(-1, -1, 3)
    t = t.permute(2, 0, 1).to(torch.float32)  # 3 H W
    if arr.dtype == np.uint8 and (lo, hi) == (0.0, 255.0):
        return t / 255.0
    span = hi - lo
    if span <= 0:
        return torch.zeros_like(t)
    return ((t - lo) / span).clamp_(0.0, 1.0)


def resize_to_model(image: torch.Tensor, size: int) -> torch.Tensor:
    """3 H W (or B 3 H W) in [0, 1] -> B 3 size size, bilinear with antialiasing.

    This is what torchvision's ``Resize`` does on tensors, so it matches the
    reference image predictor.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
