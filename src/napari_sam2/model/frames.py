"""Lazy access to the slices of a stack, converted for the model one at a time.

A :class:`FrameSource` wraps any array-like of shape (N, H, W) or (N, H, W, C)
— numpy arrays and memmaps, dask and zarr arrays, tifffile-backed arrays —
and reads a slice only when it is asked for. One intensity mapping serves the
whole stack: given limits (e.g. napari's contrast limits), or robust
percentiles computed once from a sample of slices.
"""

from __future__ import annotations

import threading
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import DEFAULT_PERCENTILES
from .preprocess import (
    InputError,
    check_range,
    default_intensity_range,
    resize_to_model,
    to_unit_rgb,
)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "compute"):  # dask
        x = x.compute()
    return np.asarray(x)


class FrameSource:
    """Slices of a stack, read lazily.

    frames: array-like (N, H, W) or (N, H, W, C), C in 1, 3, 4.
    intensity_range: (low, high) mapped to black..white for every slice; default:
    (0, 255) for uint8, else the ``percentiles`` of up to ``sample`` slices (a model's
    profile's: :meth:`for_model`).
    nonfinite: what a NaN or infinite value does: "error" (refuse the slice, the
    default) or "background" (it takes the low end of the intensity range, i.e. it
    becomes background; :attr:`nonfinite_slices` lists the slices where that happened).
    """

    def __init__(
        self,
        frames,
        intensity_range: Optional[Sequence[float]] = None,
        *,
        percentiles: Tuple[float, float] = DEFAULT_PERCENTILES,
        sample: int = 16,
        nonfinite: str = "error",
    ) -> None:
        if nonfinite not in ("error", "background"):
            raise InputError(f"nonfinite must be 'error' or 'background', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.nonfinite_slices: set = set()  # read it through nonfinite_found() from other threads
        self._nonfinite_lock = threading.Lock()
        shape = tuple(getattr(frames, "shape", ()))
        if len(shape) == 2:
            raise InputError(
                f"a stack is needed (N, H, W) or (N, H, W, C), got a single 2D image of shape {shape}; "
                "use ImagePredictor for one image, or add a leading axis"
            )
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
            raise InputError(f"frames must have shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {shape}")
        if shape[0] == 0:
            raise InputError("the stack is empty (0 slices)")
        if shape[1] == 0 or shape[2] == 0:
            raise InputError(f"slices are empty (shape {shape})")
        dtype = np.dtype(getattr(frames, "dtype", np.float32))
        if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
            raise InputError(f"frames must hold real numbers, got dtype {dtype}")
        self.frames = frames
        self.dtype = dtype
        self.num_frames = int(shape[0])
        self.height, self.width = int(shape[1]), int(shape[2])
        rng = check_range(intensity_range)
        if rng is None:
            rng = self._estimate_range(percentiles, sample)
        self.intensity_range = rng

    def __len__(self) -> int:
        return self.num_frames

    @property
    def shape(self) -> Tuple[int, int]:
        """(H, W) of one slice."""
        return self.height, self.width

    @classmethod
    def for_model(cls, model, frames, intensity_range: Optional[Sequence[float]] = None, **kwargs) -> "FrameSource":
        """``frames`` mapped as ``model``'s profile says when no range is given (its
        ``percentiles``). A FrameSource is returned as it is; it keeps its own mapping and
        NaN policy, and a different ``intensity_range`` or ``nonfinite`` is refused."""
        if isinstance(frames, FrameSource):
            asked = dict(kwargs, intensity_range=check_range(intensity_range))
            clash = [k for k, v in asked.items() if v is not None and k in ("intensity_range", "nonfinite")
                     and getattr(frames, k, v) != v]
            if clash:
                raise InputError(f"the frames are already a FrameSource with its own {clash[0]} "
                                 f"({getattr(frames, clash[0])!r}); give the array instead, or set it on the FrameSource")
            return frames
        return cls(frames, intensity_range, percentiles=model.config.profile.percentiles, **kwargs)

    def _estimate_range(self, percentiles, sample) -> Tuple[float, float]:
        if self.dtype == np.uint8:
            return 0.0, 255.0
        idx = np.unique(np.linspace(0, self.num_frames - 1, min(sample, self.num_frames)).round().astype(int))
        values = np.concatenate([_as_numpy(self.frames[int(i)]).ravel() for i in idx])
        return default_intensity_range(
            values, percentiles, "the sampled slices hold no finite value (all NaN or infinite); give intensity_range")

    def read(self, index: int, region: Optional[Tuple[slice, slice]] = None) -> np.ndarray:
        """The raw slice ``index`` as numpy (H, W) or (H, W, C), or only its ``region``
        (row and column slices); checks for NaN (in what is read)."""
        if not 0 <= index < self.num_frames:
            raise InputError(f"slice {index} is outside the stack (0..{self.num_frames - 1})")
        arr = self.frames[index]
        if region is not None:
            arr = arr[region]
        arr = _as_numpy(arr)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            if self.nonfinite == "error":
                raise InputError(
                    f"slice {index} contains NaN or infinite values; replace them (e.g. np.nan_to_num) first, "
                    "or treat them as background (nonfinite='background')"
                )
            with self._nonfinite_lock:
                self.nonfinite_slices.add(int(index))
            arr = np.where(np.isfinite(arr), arr, self.intensity_range[0])
        return arr

    def nonfinite_found(self) -> List[int]:
        """The slices found so far to hold NaN or infinite values (treated as background)."""
        with self._nonfinite_lock:
            return sorted(self.nonfinite_slices)

    def set_intensity_range(self, intensity_range: Sequence[float]) -> None:
        """Map (low, high) to black..white from now on (slices read later use it)."""
        rng = check_range(intensity_range)
        if rng is None:
            raise InputError("intensity_range must be (low, high)")
        self.intensity_range = rng

    def model_input(self, index: int, size: int) -> torch.Tensor:
        """Slice ``index`` as a 1 3 size size tensor in [0, 1] (not yet normalised)."""
        return resize_to_model(to_unit_rgb(self.read(index), self.intensity_range), size)
