"""Prompts on an n-D image to labels, without Qt: what the dock widget drives.

An image of any dimensionality (2D, Z-Y-X, T-Y-X, T-Z-Y-X, optionally RGB) is
seen as stacks of 2D slices: two *displayed* axes (rows, columns), one
*propagation* axis, and the remaining axes fixed at the viewer's position.
Each fixed position gets its own :class:`~napari_sam2.model.session.Session`.
Coordinate conversions are :mod:`napari_sam2.model.geometry`'s.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .model.ensemble import check_orientations, open_session
from .model.frames import FrameSource
from .model.geometry import (
    AxisView,
    corners_to_box,
    fixed_coords,
    labels_index,
    rc_to_xy,
    view_to_data,
)
from .model.postprocess import write_masks
from .model.preprocess import InputError
from .model.roi import Roi
from .model.session import Session

__all__ = ["AxisView", "StackSegmenter", "write_masks"]  # AxisView and write_masks live in model/


class StackSegmenter:
    """Segment objects in an n-D image from prompts given on 2D slices.

    image: the data (any array-like); rgb: last axis is colour; axis: the axis to
    propagate along (None for a 2D image); displayed: the (row, column) axes;
    intensity_range: black..white mapping (napari's contrast limits);
    orientations: 1 for plain SAM 2 tracking, or 2, 4, 8 to track in that many
    orientations and average (:class:`~napari_sam2.model.ensemble.EnsembleSession`).
    nonfinite: "error" or "background" for NaN / infinite voxels (see
    :class:`~napari_sam2.model.frames.FrameSource`).
    Other keyword arguments go to each :class:`StackSession`.

    Regions of interest: each session runs on the whole slice or on one rectangle of it
    (a :class:`~napari_sam2.model.roi.Roi` in (row, column) pixels of the displayed axes,
    seen at the model's full input size). A new object goes to the session of the region
    its first prompt names (``roi=``); later prompts of that object go where it lives.

    Work on the sessions is serialised: every call holds one lock, and a propagation
    holds it one slice at a time, so a click given while a propagation runs is done
    between two slices (the propagation goes on with the objects it started with).
    """

    def __init__(
        self,
        model,
        image,
        *,
        rgb: bool = False,
        axis: Optional[int],
        displayed: Tuple[int, int],
        intensity_range: Optional[Sequence[float]] = None,
        orientations: int = 1,
        nonfinite: str = "error",
        feature_store=None,
        **session_kwargs,
    ) -> None:
        orientations = check_orientations(orientations)
        nd = len(image.shape) - (1 if rgb else 0)
        if nd < 2:
            raise InputError(f"the image must have at least 2 dimensions, got shape {image.shape}")
        if image.shape[0] == 0 or any(s == 0 for s in image.shape):
            raise InputError(f"the image is empty (shape {tuple(image.shape)})")
        displayed = tuple(int(a) for a in displayed)
        if len(displayed) != 2 or axis in displayed:
            raise InputError("prompts need a 2D view: two displayed axes, different from the propagation axis")
        self.model, self.image, self.rgb, self.axis, self.displayed = model, image, rgb, axis, displayed
        self.ndim = nd
        self.intensity_range = intensity_range
        self.orientations = orientations
        self.session_kwargs = session_kwargs
        self.nonfinite = nonfinite
        self.feature_store = feature_store  # an embedding store of the whole stack (napari_sam2.store)
        self._store_sessions: set = set()  # keys of the sessions reading it
        self._messages: List[str] = []
        self.sessions: "OrderedDict[tuple, Session]" = OrderedDict()  # (key, region) -> session
        self._listing: Tuple[tuple, ...] = ()  # (key, region, session) of every session, replaced whole
        self.lock = threading.RLock()
        self._reported_nonfinite: set = set()

    # ------------------------------------------------------------ positions

    def key(self, position: Sequence[int]) -> tuple:
        """The fixed coordinates (axes other than displayed and propagation) of a position."""
        return tuple(self._fixed(position).values())

    def _fixed(self, position: Sequence[int]) -> Dict[int, int]:
        return fixed_coords(position, self.ndim, self.axis, self.displayed)

    def slice_of(self, position: Sequence[int]) -> int:
        return 0 if self.axis is None else int(position[self.axis])

    def view(self, position: Sequence[int]) -> AxisView:
        """The stack of slices (in view order) of the session at ``position``."""
        return AxisView(self.image, axis=self.axis, displayed=self.displayed, fixed=self._fixed(position), rgb=self.rgb)

    @property
    def slice_shape(self) -> Tuple[int, int]:
        """(rows, columns) of a slice: the displayed axes' sizes."""
        return int(self.image.shape[self.displayed[0]]), int(self.image.shape[self.displayed[1]])

    def region(self, roi) -> Optional[Roi]:
        """``roi`` checked against the slices (None, or a region covering the whole slice: None)."""
        if roi is None:
            return None
        r = Roi.parse(roi).inside(self.slice_shape)
        return None if r.is_whole(self.slice_shape) else r

    #: positions (fixed coordinates, e.g. time points of a T-Z-Y-X movie) whose sessions keep
    #: their slice features; sessions elsewhere drop their features, and are dropped when they
    #: hold no object
    keep_sessions = 2
    #: at most this many sessions keep slice features at once (the most recently used): with
    #: an object per region there can be hundreds of region sessions at one position
    keep_regions = 8

    def session(self, position: Sequence[int], roi=None) -> Session:
        """The session of the stack at ``position`` on region ``roi`` (None: whole slices)."""
        k = (self.key(position), self.region(roi))
        with self.lock:
            if k not in self.sessions:
                frames = FrameSource.for_model(self.model, self.view(position), self.intensity_range,
                                               nonfinite=self.nonfinite)
                kwargs = dict(self.session_kwargs)
                features = self._store_features(k, frames) if k[1] is None else None
                if features is not None:
                    kwargs["compute_features"] = features
                self.sessions[k] = open_session(self.model, frames, orientations=self.orientations, roi=k[1], **kwargs)
                self._evict()
                self._listing = tuple((kk, r, ss) for (kk, r), ss in self.sessions.items())
            self.sessions.move_to_end(k)
            return self.sessions[k]

    def _sessions_at(self, position: Sequence[int]) -> List[Tuple[Optional[Roi], Session]]:
        """The sessions (whole slices and regions) of the stack at ``position``."""
        k = self.key(position)
        return [(r, s) for kk, r, s in self._listing if kk == k]  # a snapshot: the GUI thread reads it too

    def _holder(self, position: Sequence[int], obj_id: int) -> Optional[Tuple[Optional[Roi], Session]]:
        """(region, session) that holds ``obj_id`` at ``position``, or None."""
        for r, s in self._sessions_at(position):
            if obj_id in s.objects:
                return r, s
        return None

    def _session_for(self, position: Sequence[int], obj_id: int, roi) -> Session:
        held = self._holder(position, obj_id)
        return held[1] if held is not None else self.session(position, roi)

    def _store_features(self, key: tuple, frames):
        """The store's features for a new session, when it matches (else None, with a message)."""
        if self.feature_store is None:
            return None
        if self.orientations != 1 or key != ((), None) or self.axis != 0 or self.displayed != (1, 2):
            self._messages.append("the embedding store is used with 1 orientation on a 3D stack seen as it was "
                                  "stored (slices along the first axis); features are computed")
            self.feature_store = None  # said once
            return None
        return self._open_store(key, frames, say_refusal=True)

    def _open_store(self, key: tuple, frames, *, say_refusal: bool):
        """The store's features for the session ``key`` if it matches ``frames``, else None."""
        from .store import open_store

        try:
            store = open_store(self.feature_store, self.model, frames)
        except InputError as err:
            if say_refusal:
                self._messages.append(f"{err}; features are computed instead")
            return None
        self._store_sessions.add(key)
        self._messages.append(f"slice features are read from {self.feature_store}")
        return store.features

    def new_messages(self) -> List[str]:
        """What happened to the embedding store since the last call (used, refused, dropped)."""
        out, self._messages = self._messages, []
        return out

    def _evict(self) -> None:
        """Bound memory while the viewer scrolls through fixed axes and objects get regions of
        their own: sessions at the most recent positions, and among them the most recently
        used ones, keep their cached slice features; any other session with objects keeps its
        prompts and memories but not its features (recomputed if it is used again), and one
        without objects is dropped."""
        order = list(self.sessions)  # least recently used first
        positions: List[tuple] = []
        for key, _roi in reversed(order):
            if key not in positions:
                positions.append(key)
        recent = set(positions[: self.keep_sessions])
        warm = set(order[-self.keep_regions:])
        for k in order:
            if k[0] in recent and k in warm:
                continue
            if self.sessions[k].objects:
                self.sessions[k].clear_features()
            else:
                del self.sessions[k]

    # ------------------------------------------------------------ settings

    def set_intensity_range(self, intensity_range: Sequence[float]) -> None:
        """A new black..white mapping for slices computed from now on (cached features are
        dropped; masks and memories computed before keep what they were made with)."""
        with self.lock:
            self.intensity_range = tuple(float(v) for v in intensity_range)
            for k, s in self.sessions.items():
                s.frames.set_intensity_range(self.intensity_range)
                s.clear_features()
                if k in self._store_sessions:  # the store's features hold the old mapping
                    s.use_features(None)
                    self._store_sessions.discard(k)
                    self._messages.append("the contrast changed, so the embedding store no longer matches; "
                                          "features are computed from now on")
            whole = ((), None)
            if self.feature_store is not None and whole in self.sessions and whole not in self._store_sessions:
                # the new contrast may be the store's: try it again for the stack's session
                s = self.sessions[whole]
                features = self._open_store(whole, s.frames, say_refusal=False)
                if features is not None:
                    s.use_features(features)

    def set_fast(self, fast: bool) -> None:
        """bfloat16 (True) or float32 for slices computed from now on."""
        with self.lock:
            self.session_kwargs["fast"] = bool(fast)
            for s in self.sessions.values():
                s.fast = bool(fast)
                s.clear_features()

    def new_nonfinite_slices(self) -> List[tuple]:
        """Positions (labels indices) of slices found since the last call to hold NaN or
        infinite values that were treated as background."""
        news = []
        for k, _roi, s in self._listing:
            for f in s.frames.nonfinite_found():
                if (k, f) not in self._reported_nonfinite:
                    self._reported_nonfinite.add((k, f))
                    news.append((k, f))
        return news

    def small_object_warning(self, mask: np.ndarray, box=None, *, roi=None,
                             min_model_pixels: float = 12.0) -> Optional[str]:
        """A sentence when a slice (or the region ``roi`` it is worked on) is shrunk so much
        for the model that the object is a few pixels or nothing at the model's input: judged
        from the box drawn (two corners as (row, col)) when there is one, else from ``mask``,
        the prompt's result."""
        h, w = mask.shape[-2:] if roi is None else Roi.parse(roi).shape
        size = self.model.image_size
        shrink = max(h, w) / size
        if shrink < 1.5:
            return None
        if box is not None:
            c = np.asarray(box, np.float64).reshape(-1, 2)
            pixels = float(np.prod(c.max(0) - c.min(0)))
        else:
            pixels = float(np.count_nonzero(mask))
        area = pixels * (size / h) * (size / w)  # at the model's input
        if area >= min_model_pixels:
            return None
        what = "an empty mask" if area == 0 else f"an object of about {area:.0f} pixels"
        return (
            f"the {'slice' if roi is None else 'region'} ({w} x {h} pixels) is shrunk {shrink:.1f} times to the "
            f"model's {size} px input, where this prompt is {what}: small objects vanish at that scale. Work on "
            f"a region around the objects ('Work in this view' after zooming in, or a region of about {size} px) "
            "for objects this small."
        )

    # ------------------------------------------------------------ undo

    def snapshot(self, position, obj_id: int):
        """The engine's state of one object at a position (with its region), for :meth:`restore`
        (undo); None when the object is not there."""
        with self.lock:
            held = self._holder(position, obj_id)
            return None if held is None else (held[0], held[1].snapshot(obj_id))

    def restore(self, position, obj_id: int, snapshot) -> None:
        """Put an object back as :meth:`snapshot` saw it (None: it goes)."""
        with self.lock:
            held = self._holder(position, obj_id)
            if held is not None:
                held[1].remove_object(obj_id)
            if snapshot is not None:
                roi, state = snapshot
                self.session(position, roi).restore(obj_id, state)

    def take_out(self, obj_id: int) -> Dict[tuple, object]:
        """Remove an object from every session (all positions); returns what :meth:`put_back` needs."""
        with self.lock:
            snaps = {}
            for (k, roi), s in list(self.sessions.items()):
                if obj_id in s.objects:
                    snaps[(k, roi)] = s.snapshot(obj_id)
                    s.remove_object(obj_id)
            return snaps

    def put_back(self, obj_id: int, snaps: Dict[tuple, object]) -> None:
        """Undo :meth:`take_out` (a session dropped meanwhile is opened again)."""
        with self.lock:
            for (k, roi), snap in snaps.items():
                self.session(self._position_of(k), roi).restore(obj_id, snap)

    def _position_of(self, key: tuple) -> tuple:
        """A position inside the session whose fixed coordinates are ``key``."""
        fixed = iter(key)
        return tuple(0 if a == self.axis or a in self.displayed else next(fixed) for a in range(self.ndim))

    def to_data_order(self, mask: np.ndarray) -> np.ndarray:
        """A mask in view order (rows, columns) -> the array's own axis order."""
        return view_to_data(mask, self.displayed)

    def block_index(self, position: Sequence[int]) -> tuple:
        """The index into a labels array of every slice of the session at ``position``
        (its fixed coordinates, the whole propagation axis)."""
        return labels_index(self.ndim, self.axis, self.displayed, self._fixed(position))

    def skipped(self, position: Sequence[int]) -> Dict[int, List[tuple]]:
        """{obj_id: labels indices of the slices its last propagation left out (early stop)}.
        Reads without waiting for running work (the GUI thread calls it)."""
        out = {}
        for _roi, s in self._sessions_at(position):
            for i in list(s.obj_ids):
                with contextlib.suppress(InputError):  # removed meanwhile by a click's worker
                    out[i] = [self.label_index(position, f) for f in s.skipped_frames(i)]
        return out

    def has_objects(self, position: Sequence[int]) -> bool:
        """Whether a session at ``position`` holds an object (without waiting for running work)."""
        return any(s.objects for _roi, s in self._sessions_at(position))

    def label_index(self, position: Sequence[int], slice_idx: int) -> tuple:
        """The index into a labels array (image shape without RGB) of one slice."""
        return labels_index(self.ndim, self.axis, self.displayed, self._fixed(position), int(slice_idx))

    # ------------------------------------------------------------ prompts

    def set_points(self, position, obj_id: int, rows_cols, labels, *, roi=None) -> np.ndarray:
        """Replace an object's clicks on the slice at ``position``; returns its H x W mask.

        rows_cols: N x 2 coordinates in the displayed axes; labels: 1 / 0; roi: the region a
        new object is tracked on (an existing object stays where it is).
        """
        with self.lock:
            session = self._session_for(position, obj_id, roi)
            masks = session.add_points(self.slice_of(position), obj_id, points=rc_to_xy(rows_cols), labels=labels)
        return masks[obj_id]

    def set_box(self, position, obj_id: int, corners, rows_cols=None, labels=None, *, roi=None) -> np.ndarray:
        """A box (two opposite corners as (row, col)) plus optional clicks; returns the mask."""
        box = corners_to_box(corners)
        pts = None if rows_cols is None or len(rows_cols) == 0 else rc_to_xy(rows_cols)
        with self.lock:
            masks = self._session_for(position, obj_id, roi).add_points(
                self.slice_of(position), obj_id, points=pts, labels=None if pts is None else labels, box=box
            )
        return masks[obj_id]

    def set_mask(self, position, obj_id: int, mask: np.ndarray, *, roi=None) -> np.ndarray:
        with self.lock:
            masks = self._session_for(position, obj_id, roi).add_mask(self.slice_of(position), obj_id, mask)
        return masks[obj_id]

    def forget_slice(self, position, obj_id: int) -> bool:
        """Forget an object's prompts on one slice; an object left with no prompt at all is
        removed. Returns whether the object still exists."""
        with self.lock:
            held = self._holder(position, obj_id)
            if held is None:
                return False
            s = held[1]
            s.clear_frame(self.slice_of(position), obj_id)
            if not s.objects[obj_id].prompted_frames:
                s.remove_object(obj_id)
            return obj_id in s.objects

    def prefetch(self, position, frames: Sequence[int], roi=None) -> None:
        """Compute slice features ahead, one slice at a time (other work can come between)."""
        for f in frames:
            with self.lock:
                self.session(position, roi).prefetch([f])

    def propagate(
        self, position, direction: str = "both", frame_range=None, *, view: bool = False, **options
    ) -> Iterator[Tuple[tuple, Dict[int, np.ndarray]]]:
        """Yields (labels index of a slice, {obj_id: mask}) as slices are computed (with
        ``view``: (slice number, {obj_id: mask in view order}), as a session gives them).

        options: obj_ids, object_ranges, stop_after_absent (see StackSession.propagate).
        The session's lock is held while a slice is computed, not between slices.
        """
        if self.axis is None:
            raise InputError("this image is 2D: there is no axis to propagate along")
        ids = options.pop("obj_ids", None)
        wanted = None if ids is None else [int(v) for v in ids]
        lo, hi = (-np.inf, np.inf) if frame_range is None else frame_range
        with self.lock:
            # each session (the whole slices, each region) tracks its own objects, one after
            # the other; one with no object prompted inside the range is left out
            runs = []
            for _roi, s in self._sessions_at(position):
                mine = [i for i in s.obj_ids if wanted is None or i in wanted]
                if any(lo <= f <= hi for i in mine for f in s.objects[i].prompted_frames):
                    runs.append((s, mine))
            if not runs:  # the session says what is missing
                runs = [(self.session(position), wanted)]
        for s, mine in runs:
            with self.lock:
                run = s.propagate(direction, frame_range=frame_range, **options,
                                  **({} if wanted is None else {"obj_ids": mine}))
            while True:
                with self.lock:  # the first step checks and commits the prompts
                    item = next(run, None)
                if item is None:
                    break
                f, masks = item
                if view:
                    yield f, dict(masks)
                else:
                    yield self.label_index(position, f), {i: self.to_data_order(m) for i, m in masks.items()}
