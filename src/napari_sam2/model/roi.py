"""Regions of interest: track objects on a rectangle of the slices, at full detail.

SAM 2 sees every slice resized to its input size (1024 px for Meta's models,
128 px for the bundled nano model). On a 2048 x 2048 frame a 15-pixel nucleus
becomes a few pixels at that size. A :class:`RoiSession` runs any session on a
rectangle of the slices instead: the rectangle is what is resized to the model's
input, so a region no larger than the input is seen at its own resolution.
Prompts and results stay in the coordinates of the whole slice: clicks are
shifted into the region, and masks come back at the slice's full size.

Example::

    roi = Roi.around(x=812, y=1430, side=128, shape=volume.shape[1:])
    session = RoiSession(model, volume, roi)
    session.add_points(frame=20, obj_id=1, points=[[812, 1430]], labels=[1])
    for z, masks in session.propagate("both"):   # H x W masks of the whole slice
        labels[z][masks[1]] = 1
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .frames import FrameSource
from .preprocess import InputError
from .prompts import check_mask
from .sam2 import NO_OBJ_SCORE
from .video import SessionCommon, check_frame

__all__ = ["RegionFrames", "Roi", "RoiSession", "region_around"]


@dataclass(frozen=True)
class Roi:
    """A rectangle of a slice: rows ``top`` .. ``bottom - 1``, columns ``left`` .. ``right - 1``
    (pixel indices, end excluded, as numpy slicing takes them)."""

    top: int
    left: int
    bottom: int
    right: int

    def __post_init__(self) -> None:
        for name in ("top", "left", "bottom", "right"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise InputError(f"a region's {name} must be a whole pixel index, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.top < 0 or self.left < 0:
            raise InputError(f"a region cannot start before the slice: top={self.top}, left={self.left}")
        if self.bottom <= self.top or self.right <= self.left:
            raise InputError(f"a region needs top < bottom and left < right, got rows {self.top}:{self.bottom}, "
                             f"columns {self.left}:{self.right}")

    # ---------------------------------------------------------------- making one

    @classmethod
    def parse(cls, value: Union["Roi", Sequence[int], str]) -> "Roi":
        """A Roi from a Roi, (top, left, bottom, right), or the text "Y0:Y1,X0:X1" (rows, columns)."""
        if isinstance(value, Roi):
            return value
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*", value)
            if m is None:
                raise InputError(f"a region is written ROW0:ROW1,COL0:COL1 (e.g. 100:356,40:296), got {value!r}")
            y0, y1, x0, x1 = (int(g) for g in m.groups())
            return cls(y0, x0, y1, x1)
        try:
            vals = [v for v in value]
        except TypeError:
            raise InputError(f"a region is (top, left, bottom, right) or 'ROW0:ROW1,COL0:COL1', got {value!r}") from None
        if len(vals) != 4:
            raise InputError(f"a region is (top, left, bottom, right): four numbers, got {len(vals)}")
        return cls(*vals)

    @classmethod
    def around(cls, x: float, y: float, side: int, shape: Tuple[int, int]) -> "Roi":
        """A ``side`` x ``side`` square centred on the point (x, y) = (column, row), moved to lie
        inside a slice of ``shape`` (H, W); a slice smaller than ``side`` gives its whole extent."""
        h, w = (int(v) for v in shape[:2])
        side = int(side)
        if side < 1:
            raise InputError(f"a region's side must be at least 1 pixel, got {side}")

        def span(centre: float, n: int) -> Tuple[int, int]:
            if side >= n:
                return 0, n
            start = int(round(centre - side / 2))
            start = min(max(start, 0), n - side)
            return start, start + side

        top, bottom = span(y, h)
        left, right = span(x, w)
        return cls(top, left, bottom, right)

    @classmethod
    def from_corners(cls, corners, shape: Tuple[int, int]) -> "Roi":
        """The pixels a rectangle covers, from its corners as (row, column) pairs (e.g. napari's
        canvas view or a drawn rectangle; pixel centres at integers), clipped to the slice."""
        c = np.asarray(corners, np.float64).reshape(-1, 2)
        if not np.isfinite(c).all():
            raise InputError("a region's corners must be finite numbers")
        lo = np.floor(c.min(0) + 0.5).astype(int)
        hi = np.floor(c.max(0) + 0.5).astype(int) + 1
        h, w = (int(v) for v in shape[:2])
        top, left = max(lo[0], 0), max(lo[1], 0)
        bottom, right = min(hi[0], h), min(hi[1], w)
        if bottom <= top or right <= left:
            raise InputError(f"the rectangle (rows {c[:, 0].min():g}..{c[:, 0].max():g}, columns "
                             f"{c[:, 1].min():g}..{c[:, 1].max():g}) does not cover any pixel of the {h} x {w} slice")
        return cls(top, left, bottom, right)

    # ---------------------------------------------------------------- geometry

    @property
    def shape(self) -> Tuple[int, int]:
        """(rows, columns) of the region."""
        return self.bottom - self.top, self.right - self.left

    @property
    def slices(self) -> Tuple[slice, slice]:
        return slice(self.top, self.bottom), slice(self.left, self.right)

    def __str__(self) -> str:
        return f"{self.top}:{self.bottom},{self.left}:{self.right}"

    def inside(self, shape: Tuple[int, int]) -> "Roi":
        """This region, checked to lie inside a slice of ``shape`` (H, W)."""
        h, w = (int(v) for v in shape[:2])
        if self.bottom > h or self.right > w:
            raise InputError(f"the region rows {self.top}:{self.bottom}, columns {self.left}:{self.right} reaches "
                             f"outside the {h} x {w} slice; choose one inside it")
        return self

    def is_whole(self, shape: Tuple[int, int]) -> bool:
        return (self.top, self.left, self.bottom, self.right) == (0, 0, int(shape[0]), int(shape[1]))

    def check_xy(self, xy, what: str) -> np.ndarray:
        """``xy`` (... x 2 (x, y) pixels of the whole slice) shifted into the region; refuses
        coordinates outside it with a message that says where the region is."""
        pts = np.asarray(xy, np.float32)
        if pts.size and pts.shape[-1] != 2:
            raise InputError(f"{what} must be (x, y) pairs, got shape {pts.shape}")
        p = pts.reshape(-1, 2)
        if not np.isfinite(p).all():
            raise InputError(f"{what} contain NaN or infinite coordinates")
        out = ((p[:, 0] < self.left - 0.5) | (p[:, 0] > self.right - 0.5)
               | (p[:, 1] < self.top - 0.5) | (p[:, 1] > self.bottom - 0.5))
        if out.any():
            x, y = p[out][0]
            raise InputError(
                f"{what} has a point (x={x:g}, y={y:g}) outside the region of interest (rows {self.top}:{self.bottom}, "
                f"columns {self.left}:{self.right}); prompt inside it, or work on a region that holds the object"
            )
        return pts - np.array([self.left, self.top], np.float32)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The region of an H x W (x C) slice."""
        return image[self.slices]

    def paste(self, part: np.ndarray, shape: Tuple[int, int], fill=0) -> np.ndarray:
        """A region-sized array put into a new full slice of ``shape``, ``fill`` elsewhere."""
        full = np.full(tuple(shape[:2]) + part.shape[2:], fill, dtype=part.dtype)
        full[self.slices] = part
        return full


def region_around(shape: Tuple[int, int], side: int, *, xy=None, mask=None) -> Roi:
    """A square region around an object's prompts on a slice of ``shape`` (H, W): clicks or
    box corners (``xy``, N x 2 (x, y)) or a ``mask`` (H x W). Its side is ``side`` (e.g. the
    model's input size: the region is seen at its own resolution), or twice the prompts'
    extent when that is larger, so the object and its surroundings fit."""
    if mask is not None:
        rows, cols = np.nonzero(np.asarray(mask))
        if not rows.size:
            raise InputError("an empty mask has no region around it")
        pts = np.stack([cols, rows], 1).astype(np.float64)
    else:
        pts = np.asarray(xy, np.float64).reshape(-1, 2)
        if not pts.size:
            raise InputError("a region around an object needs its clicks, box or mask")
    lo, hi = pts.min(0), pts.max(0)
    side = max(int(side), int(np.ceil(2 * float((hi - lo).max()))) + 1)
    x, y = (lo + hi) / 2
    return Roi.around(x=x, y=y, side=side, shape=shape)


class RegionFrames(FrameSource):
    """The region ``roi`` of every slice of ``parent``, read lazily through it: the parent's
    intensity mapping (the whole stack's, so a region looks as it does in the viewer) and
    its NaN policy; NaN slices found are listed by the parent."""

    def __init__(self, parent: FrameSource, roi: Roi) -> None:  # no super().__init__: nothing to estimate
        self.parent = parent
        self.roi = Roi.parse(roi).inside(parent.shape)
        self.frames = parent.frames
        self.dtype = parent.dtype
        self.nonfinite = parent.nonfinite
        self.num_frames = parent.num_frames
        self.height, self.width = self.roi.shape

    @property
    def intensity_range(self) -> Tuple[float, float]:
        return self.parent.intensity_range

    @intensity_range.setter
    def intensity_range(self, value) -> None:
        self.parent.set_intensity_range(value)

    def read(self, index: int) -> np.ndarray:
        return self.parent.read(index, region=self.roi.slices)

    def nonfinite_found(self) -> List[int]:
        return self.parent.nonfinite_found()


class PastedMasks(Mapping):
    """A region's {obj_id: mask} seen as whole-slice masks, each pasted when first read."""

    def __init__(self, roi: Roi, masks: Mapping[int, np.ndarray], shape, logits: bool) -> None:
        self._roi, self._masks, self._shape = roi, masks, tuple(shape)
        self._fill = NO_OBJ_SCORE if logits else False
        self._done: Dict[int, np.ndarray] = {}

    def __getitem__(self, obj_id) -> np.ndarray:
        key = int(obj_id)
        if key not in self._done:
            self._done[key] = self._roi.paste(self._masks[key], self._shape, self._fill)
        return self._done[key]

    def __iter__(self):
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)


class RoiSession(SessionCommon):
    """A session on a rectangle of the slices, in the whole slice's coordinates.

    model: a loaded SAM2Model; frames: a :class:`FrameSource` or any (N, H, W[, C])
    array-like; roi: a :class:`Roi` or what :meth:`Roi.parse` takes; orientations
    and the other keywords go to the session run on the region
    (:func:`~napari_sam2.model.ensemble.open_session`). Clicks, boxes and masks are
    given on the whole H x W slice and must lie inside the region (else an
    :class:`InputError` says so); masks come back H x W, empty (or at the "absent"
    logit) outside the region. :meth:`propagate_logits` and :meth:`step` return the
    model's low-resolution logits of the region.
    """

    def __init__(self, model, frames, roi, *, orientations: int = 1, intensity_range: Optional[Sequence[float]] = None,
                 **session_kwargs) -> None:
        from .ensemble import open_session

        self.frames = FrameSource.for_model(model, frames, intensity_range)
        self.roi = Roi.parse(roi).inside(self.frames.shape)
        self.region_frames = RegionFrames(self.frames, self.roi)
        self.inner = open_session(model, self.region_frames, orientations=orientations, **session_kwargs)
        self.num_frames = self.frames.num_frames
        self.height, self.width = self.frames.shape

    # what the inner session holds
    @property
    def fast(self) -> bool:
        return self.inner.fast

    @fast.setter
    def fast(self, value: bool) -> None:
        self.inner.fast = value

    @property
    def objects(self):
        return self.inner.objects

    @property
    def obj_ids(self) -> List[int]:
        return self.inner.obj_ids

    @property
    def state_nbytes(self) -> int:
        return self.inner.state_nbytes

    def _full(self, masks: Mapping[int, np.ndarray], logits: bool) -> Mapping[int, np.ndarray]:
        return PastedMasks(self.roi, masks, (self.height, self.width), logits)

    # prompts, in the whole slice's coordinates
    def add_points(self, frame: int, obj_id: int, points=None, labels=None, box=None, *, clear: bool = True,
                   return_logits: bool = False) -> Dict[int, np.ndarray]:
        frame = check_frame(frame, self.num_frames)
        pts = None if points is None else self.roi.check_xy(points, "points")
        bx = None
        if box is not None:
            b = np.asarray(box, np.float32)
            if b.shape != (4,):
                raise InputError(f"box must be (x0, y0, x1, y1), got shape {b.shape}")
            bx = self.roi.check_xy(b.reshape(2, 2), "the box").reshape(4)
        out = self.inner.add_points(frame, obj_id, pts, labels, bx, clear=clear, return_logits=return_logits)
        return self._full(out, return_logits)

    def add_mask(self, frame: int, obj_id: int, mask, *, return_logits: bool = False) -> Dict[int, np.ndarray]:
        frame = check_frame(frame, self.num_frames)
        m = check_mask(mask, (self.height, self.width))
        outside = int(np.count_nonzero(m)) - int(np.count_nonzero(self.roi.crop(m)))
        if outside:
            raise InputError(f"the mask of object {obj_id} has {outside} pixel(s) outside the region of interest "
                             f"(rows {self.roi.top}:{self.roi.bottom}, columns {self.roi.left}:{self.roi.right}); "
                             "keep it inside, or work on a region that holds the object")
        return self._full(self.inner.add_mask(frame, obj_id, self.roi.crop(m), return_logits=return_logits), return_logits)

    # editing, undo and features: the inner session's
    def clear_frame(self, frame: int, obj_id: int) -> None:
        self.inner.clear_frame(frame, obj_id)

    def remove_object(self, obj_id: int) -> None:
        self.inner.remove_object(obj_id)

    def reset(self) -> None:
        self.inner.reset()

    def snapshot(self, obj_id: int):
        return self.inner.snapshot(obj_id)

    def restore(self, obj_id: int, snapshot) -> None:
        self.inner.restore(obj_id, snapshot)

    def clear_features(self) -> None:
        self.inner.clear_features()

    def prefetch(self, frames: Sequence[int]) -> None:
        self.inner.prefetch(frames)

    def skipped_frames(self, obj_id: int) -> List[int]:
        return self.inner.skipped_frames(obj_id)

    # propagation
    def propagate(self, direction: str = "both", *, stop_after_absent: Optional[int] = None,
                  return_logits: bool = False, **plan_kwargs) -> Iterator[Tuple[int, Dict[int, np.ndarray]]]:
        run = self.inner.propagate(direction, stop_after_absent=stop_after_absent, return_logits=return_logits,
                                   **plan_kwargs)
        for frame, masks in run:
            yield frame, self._full(masks, return_logits)

    def propagate_logits(self, direction: str = "both", *, stop_after_absent: Optional[int] = None, **plan_kwargs):
        return self.inner.propagate_logits(direction, stop_after_absent=stop_after_absent, **plan_kwargs)

    def step(self, frame: int, obj_ids: Sequence[int], reverse: bool):
        return self.inner.step(frame, obj_ids, reverse)
