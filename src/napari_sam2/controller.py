"""The annotation workflow without Qt: objects, prompts, propagation, undo, save and resume.

:class:`Annotator` owns what a user makes on an n-D image: the objects (label numbers,
their prompts per slice, hidden or shown), the engine sessions (through a
:class:`~napari_sam2.segmenter.StackSegmenter`), the work queue and the undo history.
It writes masks into its ``labels`` array and reports through callbacks; the dock
widget only turns layer events and buttons into calls and refreshes the layer when
told. Everything here runs without a viewer, which is how it is tested.

Coordinates: a *position* is a full n-D index of the image (without the RGB axis), as
napari's ``dims.current_step`` gives it; prompts are n-D data coordinates (clicks) or
two n-D corners (boxes). The conversions live in :mod:`napari_sam2.model.geometry`.
"""

from __future__ import annotations

import datetime
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .jobs import Executor, Job, JobQueue, SyncExecutor
from .model.config import ModelProfile
from .model.geometry import data_point, data_to_view, on_slice, point_rc, view_to_data
from .model.preprocess import InputError
from .model.roi import Roi, region_around
from .segmenter import StackSegmenter, write_masks

UNDO_DEPTH = 50
SESSION_FORMAT = "napari-sam2 session"
SESSION_VERSION = 1


@dataclass
class SlicePrompts:
    """One object's prompts on one slice, in the view's (row, column) coordinates."""

    points: Tuple[Tuple[float, float], ...] = ()
    labels: Tuple[int, ...] = ()
    box: Optional[Tuple[Tuple[float, float], Tuple[float, float]]] = None  # two corners
    mask: Optional[np.ndarray] = None  # a painted mask (view order)

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None and self.mask is None

    def signature(self) -> tuple:
        rnd = lambda rc: tuple(tuple(round(float(v), 3) for v in p) for p in rc)
        mask = None if self.mask is None else (self.mask.shape, np.packbits(self.mask).tobytes())
        return rnd(self.points), tuple(self.labels), None if self.box is None else rnd(self.box), mask


@dataclass
class AnnotatedObject:
    """An object the user made: its label, its prompts per slice, whether it is hidden."""

    obj_id: int
    prompts: Dict[tuple, SlicePrompts] = field(default_factory=dict)  # slice key -> prompts
    hidden: bool = False
    version: int = 0  # changes with every prompt change
    propagated: Optional[int] = None  # the version its last propagation started from
    deleting: bool = False  # a deletion is queued
    roi: Optional[Roi] = None  # the region of the slices it is tracked on (None: whole slices)


@dataclass
class ObjectRow:
    """One line of the object table."""

    obj_id: int
    prompted_slices: List[int]
    filled_slices: int
    hidden: bool


def parse_slice_range(text: str) -> Optional[Tuple[int, int]]:
    """A slice range typed by a user: "" -> None (all slices); "10-40", "10:40" or
    "10,40" -> (10, 40) (either order)."""
    text = (text or "").strip()
    if not text:
        return None
    for sep in ("-", ":", ","):
        a, found, b = text.partition(sep)
        if found and a.strip().isdigit() and b.strip().isdigit():
            lo, hi = sorted((int(a), int(b)))
            return lo, hi
    raise InputError(f"slices {text!r}: give a range as first-last (e.g. 10-40), or leave it empty for all")


def _noop(*_a, **_k) -> None:
    return None


def _message(err: BaseException) -> str:
    if isinstance(err, (InputError, ValueError, FileNotFoundError)):
        return str(err)
    return f"{err.__class__.__name__}: {err}"


class Annotator:
    """Objects and prompts on an n-D image, turned into labels by a SAM 2 model.

    model: a loaded SAM2Model; image: any array-like (2D, Z-Y-X, T-Z-Y-X, optionally
    RGB); roi: where new objects are tracked (:meth:`set_roi`); labels: the array masks
    are written into (the image's shape without RGB; a new uint16 array if None) — labels
    already in it are the user's and are never written or erased; executor: where work
    runs (:class:`~napari_sam2.jobs.SyncExecutor` by default: at once). The view (rgb;
    axis: the axis to propagate along, None for 2D; displayed: the (row, column) axes) and
    the sessions' options (intensity_range, orientations, fast, nonfinite, ...) go to
    :class:`~napari_sam2.segmenter.StackSegmenter`. model_info: what produced
    the labels (model name, checkpoint), recorded in the saved session.

    Callbacks (attributes, no-ops by default): ``on_labels(replaced)`` after labels were
    written (``replaced``: the array itself was replaced, e.g. widened to a larger
    dtype); ``on_status(text)``; ``on_notify(level, text)`` with level "info",
    "warning" or "error"; ``on_objects()`` when the object table changed;
    ``on_restore(tag)`` when undo puts back a change that came with a ``tag``.
    """

    def __init__(
        self,
        model,
        image,
        *,
        labels: Optional[np.ndarray] = None,
        stop_after: Optional[int] = None,
        executor: Optional[Executor] = None,
        model_info: Optional[dict] = None,
        roi=None,
        **segmenter_kwargs,
    ) -> None:
        # how the model is best used (a stand-in without a config gets the default profile)
        profile = getattr(getattr(model, "config", None), "profile", None) or ModelProfile()
        segmenter_kwargs.setdefault("corrections_as_conditioning", profile.corrections_as_conditioning)
        # the view (rgb, axis, displayed) and the sessions' options are the segmenter's
        self.segmenter = StackSegmenter(model, image, **segmenter_kwargs)
        shape = tuple(image.shape[:-1] if self.segmenter.rgb else image.shape)
        if labels is None:
            labels = np.zeros(shape, np.uint16)
        elif tuple(labels.shape) != shape:
            raise InputError(f"the labels array has shape {tuple(labels.shape)}, the image {shape}: they must match")
        self.labels = labels
        self.user_labels = frozenset(int(v) for v in np.unique(np.asarray(labels))) - {0}
        self.stop_after = stop_after
        self.model_info = dict(model_info or {"name": getattr(getattr(model, "config", None), "name", None)})
        self.objects: Dict[int, AnnotatedObject] = {}
        self.active = max(self.user_labels, default=0) + 1
        self.history: List[dict] = []  # propagations run, for the saved record
        self.queue = JobQueue(executor or SyncExecutor())
        self.queue.after_each = self._report_nonfinite
        self._undo: List[dict] = []
        self._propagation: Optional[Job] = None
        self._next_free = 0  # while an automatic run hands out labels: the lowest it has not given
        self._ids = threading.Lock()
        self._running: Optional[dict] = None  # the undo entry of the running propagation
        self.roi: Union[None, str, Roi] = None  # where new objects are tracked: see set_roi
        self.status = ""
        self.on_labels: Callable[[bool], None] = _noop
        self.on_status: Callable[[str], None] = _noop
        self.on_notify: Callable[[str, str], None] = _noop
        self.on_objects: Callable[[], None] = _noop
        self.on_restore: Callable[[object], None] = _noop
        if roi is not None:
            self.set_roi(roi)

    # ------------------------------------------------------------------ small helpers

    @property
    def axis(self) -> Optional[int]:
        return self.segmenter.axis

    @property
    def displayed(self) -> Tuple[int, int]:
        return self.segmenter.displayed

    @property
    def ndim(self) -> int:
        return self.segmenter.ndim

    @property
    def is_busy(self) -> bool:
        """Whether model work runs or waits (a propagation included)."""
        return self.queue.busy or self._propagation is not None

    @property
    def is_propagating(self) -> bool:
        return self._propagation is not None

    def _say(self, text: str) -> None:
        self.status = text
        self.on_status(text)

    def _failed(self, what: str, quiet: bool = False):
        def handler(err: BaseException) -> None:
            msg = _message(err)
            if not quiet:
                self.on_notify("error", f"napari-sam2: {what} failed: {msg}")
                self._say(f"Failed while {what}: {msg}")

        return handler

    def slice_key(self, position: Sequence[int]) -> tuple:
        """A position with the displayed axes zeroed: which slice it is."""
        return tuple(0 if a in self.displayed else round(float(position[a])) for a in range(self.ndim))

    def slice_index(self, position: Sequence[int]) -> tuple:
        """The index of a position's slice into ``labels``."""
        pos = self.slice_key(position)
        return self.segmenter.label_index(pos, self.segmenter.slice_of(pos))

    def _write(self, index: tuple, masks: Dict[int, np.ndarray]) -> None:
        masks = {k: m for k, m in masks.items() if k not in self.user_labels}
        if masks:
            write_masks(self.labels, index, masks)
            self.on_labels(False)

    def ensure_fits(self, label: int) -> None:
        """Widen the labels' dtype when ``label`` does not fit (e.g. label 256 in uint8)."""
        dtype = np.dtype(self.labels.dtype)
        if np.issubdtype(dtype, np.integer) and label <= np.iinfo(dtype).max:
            return
        wider = np.uint16 if label <= np.iinfo(np.uint16).max else np.uint32
        self.labels = np.asarray(self.labels).astype(wider)
        self.on_notify("info", f"napari-sam2: the labels were {dtype}, which cannot hold label {label}; they are now "
                               f"{np.dtype(wider)} (your labels are unchanged).")
        self.on_labels(True)

    # ------------------------------------------------------------------ objects

    def next_label(self) -> int:
        """The first label above every label in use (the user's, objects', the array's)."""
        top = int(self.labels.max()) if self.labels.size else 0
        return max(max([top, *self.user_labels, *self.objects, 0]) + 1, self._next_free)

    def new_object(self) -> int:
        """Make the next free label the active object; returns it."""
        with self._ids:
            label = self.next_label()
            if self._next_free:  # an automatic run hands out labels: this one is taken
                self._next_free = label + 1
        self.ensure_fits(label)
        self.active = label
        self._say(f"New object: label {label}.")
        return label

    def select(self, obj_id: int) -> None:
        """Make ``obj_id`` the active object (new prompts go to it)."""
        self.active = int(obj_id)
        if self.active in self.user_labels:
            self._say(f"Label {obj_id} was in the labels before the session, so SAM 2 never writes it: "
                      "prompts now start a new object.")

    # ------------------------------------------------------------------ regions of interest

    def set_roi(self, roi) -> Optional[Roi]:
        """Where objects made from now on are tracked: None (whole slices), a region (a
        :class:`~napari_sam2.model.roi.Roi`, (top, left, bottom, right) or "ROW0:ROW1,COL0:COL1"
        in pixels of the displayed axes), or "auto" (a square of the model's input size around
        each new object's first prompt, larger for a larger box or mask). A region is seen at
        the model's full input size, so small objects in a large slice keep their detail.
        Objects made before keep their own region. Returns the region (None for auto or whole)."""
        if isinstance(roi, str) and roi.strip().lower() == "auto":
            self.roi = "auto"
            self._say(f"New objects are tracked on a region of about {self.segmenter.model.image_size} px around "
                      "their first prompt.")
            return None
        region = self.segmenter.region(roi)
        self.roi = region
        self._say("New objects are tracked on whole slices." if region is None else
                  f"New objects are tracked on rows {region.top}:{region.bottom}, columns "
                  f"{region.left}:{region.right} (prompts must lie inside it).")
        return region

    def _region_for(self, prompts: "SlicePrompts") -> Optional[Roi]:
        """The region a new object with these first prompts is tracked on."""
        if self.roi != "auto":
            return self.roi
        seg = self.segmenter
        if prompts.mask is not None and not prompts.mask.any():
            return None
        rc = np.asarray([*prompts.points, *(prompts.box or ())], np.float64).reshape(-1, 2)
        return seg.region(region_around(seg.slice_shape, seg.model.image_size, xy=rc[:, ::-1],
                                        mask=prompts.mask))

    def object_for_prompt(self) -> int:
        """The object a new prompt belongs to: the active one, or a new one if the active
        label is one of the user's own (or 0)."""
        if self.active in self.user_labels or self.active <= 0:
            return self.new_object()
        self.ensure_fits(self.active)
        return self.active

    def object_table(self) -> List[ObjectRow]:
        """A row per object: prompted slices (along the propagation axis), the number of
        2D slices its label fills, hidden or not."""
        filled = self._filled_counts(list(self.objects))
        rows = []
        for obj in sorted(self.objects.values(), key=lambda o: o.obj_id):
            prompted = sorted({k[self.axis] if self.axis is not None else 0 for k in obj.prompts})
            rows.append(ObjectRow(obj.obj_id, prompted, filled.get(obj.obj_id, 0), obj.hidden))
        return rows

    def _filled_counts(self, ids: List[int]) -> Dict[int, int]:
        if not ids:
            return {}
        lab = np.moveaxis(np.asarray(self.labels), self.displayed, (-2, -1))
        flat = lab.reshape(-1, lab.shape[-2] * lab.shape[-1])
        counts = dict.fromkeys(ids, 0)
        top = max(ids)
        for sl in flat:
            if sl.any():
                present = np.bincount(sl[sl <= top].astype(np.int64), minlength=top + 1)
                for i in ids:
                    counts[i] += bool(present[i])
        return counts

    def set_hidden(self, obj_id: int, hidden: bool) -> None:
        self._object(obj_id).hidden = bool(hidden)
        self.on_objects()

    @property
    def hidden(self) -> List[int]:
        return sorted(o.obj_id for o in self.objects.values() if o.hidden)

    def _object(self, obj_id: int) -> AnnotatedObject:
        if int(obj_id) not in self.objects:
            raise InputError(f"there is no object {obj_id}; objects: {sorted(self.objects) or 'none yet'}")
        return self.objects[int(obj_id)]

    def delete_object(self, obj_id: int, *, tag=None) -> None:
        """Remove an object: its labels everywhere, its prompts, its engine state.
        ``tag`` comes back through ``on_restore`` if the deletion is undone."""
        obj = self._object(obj_id)
        seg = self.segmenter
        if self.is_propagating or obj.deleting:
            self._say(f"Object {obj_id} cannot be deleted while a propagation runs (or is already being deleted).")
            return
        obj.deleting = True

        def work():
            return seg.take_out(obj.obj_id)

        def done(snaps):
            obj.deleting = False
            if self.objects.get(obj.obj_id) is not obj:
                return
            where = np.nonzero(np.asarray(self.labels) == obj.obj_id)
            self.labels[where] = 0
            self.objects.pop(obj.obj_id, None)
            self._push({"kind": "delete", "obj": obj, "snaps": snaps, "where": where, "tags": [] if tag is None else [tag]})
            self.on_labels(False)
            self.on_objects()
            self._say(f"Object {obj.obj_id} deleted with its labels and prompts (Ctrl+Z brings it back).")

        def failed(err):
            obj.deleting = False
            self._failed("deleting an object")(err)

        self.queue.submit(("delete", obj.obj_id), Job(work, on_result=done, on_error=failed))

    # ------------------------------------------------------------------ prompts

    def prompts_on_slice(self, position: Sequence[int]) -> Dict[int, SlicePrompts]:
        """{object: its prompts} on the slice at ``position``."""
        key = self.slice_key(position)
        return {o.obj_id: o.prompts[key] for o in self.objects.values() if key in o.prompts}

    def sync_slice(self, position: Sequence[int], clicks: Iterable = (), boxes: Iterable = (), *, tag=None) -> List[int]:
        """Bring the objects' clicks and boxes on one slice in line with what the layers hold.

        clicks: (n-D coordinate, positive, object) triples; boxes: (corners, object) pairs,
        corners an (M, n) array whose extreme rows and columns bound the box (a napari
        rectangle's four corners, or two). Points off this slice are ignored. Objects
        whose prompts here changed are computed again (re-sending the same prompts would
        not be a no-op: SAM 2 feeds its previous mask back in). Returns those objects.
        """
        key = self.slice_key(position)
        new: Dict[int, SlicePrompts] = {}
        for coord, positive, obj in clicks:
            if on_slice(coord, key, self.displayed):
                p = new.setdefault(int(obj), SlicePrompts())
                p.points += (point_rc(coord, self.displayed),)
                p.labels += (1 if positive else 0,)
        for corners, obj in boxes:
            corners = np.asarray(corners, float).reshape(-1, self.ndim)
            if all(on_slice(c, key, self.displayed) for c in corners):
                rc = np.array([point_rc(c, self.displayed) for c in corners])
                lo, hi = rc.min(0), rc.max(0)
                new.setdefault(int(obj), SlicePrompts()).box = ((float(lo[0]), float(lo[1])), (float(hi[0]), float(hi[1])))
        had = {o for o, p in self.prompts_on_slice(key).items() if p.points or p.box is not None}
        changed = []
        for obj in sorted((set(new) | had) - self.user_labels - {0}):
            old = self.objects[obj].prompts.get(key) if obj in self.objects else None
            want = new.get(obj, SlicePrompts())
            if old is not None and old.mask is not None and want.empty:
                continue  # a painted mask stays until painted over or undone
            if old is None and want.empty:
                continue
            if old is not None and old.signature() == want.signature():
                continue
            self._apply(key, obj, want, tag=tag)
            changed.append(obj)
        return changed

    def prompt_items(self) -> Tuple[List[tuple], List[tuple]]:
        """Every click and box in data coordinates, as :meth:`sync_slice` takes them:
        ([(n-D coordinate, positive, object)], [(4 x n corners of the rectangle, object)])."""
        clicks, boxes = [], []
        for obj in sorted(self.objects.values(), key=lambda o: o.obj_id):
            for key, p in sorted(obj.prompts.items()):
                clicks += [(data_point(key, rc, self.displayed), bool(lab), obj.obj_id) for rc, lab in zip(p.points, p.labels)]
                if p.box is not None:
                    (r0, c0), (r1, c1) = p.box
                    corners = [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]
                    boxes.append(([data_point(key, rc, self.displayed) for rc in corners], obj.obj_id))
        return clicks, boxes

    def set_prompts(self, position: Sequence[int], obj_id: int, *, points=(), labels=(), box=None, tag=None) -> None:
        """Replace one object's clicks / box on a slice (view (row, column) coordinates);
        nothing given: forget its prompts there (an object left without prompts is removed)."""
        prompts = SlicePrompts(tuple((float(r), float(c)) for r, c in points), tuple(int(v) for v in labels),
                               None if box is None else tuple(tuple(map(float, c)) for c in box))
        self._apply(self.slice_key(position), int(obj_id), prompts, tag=tag)

    def paint(self, position: Sequence[int], obj_id: Optional[int] = None, *, tag=None) -> bool:
        """The object's pixels on the slice at ``position`` in ``labels`` (e.g. painted
        with napari's brush) become its mask prompt there. Returns False when there are none."""
        obj_id = self.active if obj_id is None else int(obj_id)
        if obj_id in self.user_labels or obj_id <= 0:
            return False
        key = self.slice_key(position)
        mask = data_to_view(np.asarray(self.labels[self.slice_index(key)]) == obj_id, self.displayed)
        if not mask.any():
            return False
        self._apply(key, obj_id, SlicePrompts(mask=mask), tag=tag, kind="paint")
        return True

    def _apply(self, key: tuple, obj_id: int, prompts: SlicePrompts, *, tag=None, kind: str = "prompt") -> None:
        seg = self.segmenter
        obj = self.objects.get(obj_id)
        created = obj is None
        if created:
            if prompts.empty:
                return
            self.ensure_fits(obj_id)
            obj = self.objects[obj_id] = AnnotatedObject(obj_id, roi=self._region_for(prompts))
        previous = obj.prompts.get(key)
        tags = [tag] if tag is not None else []
        waiting = self.queue.pending((kind, obj_id, key))
        if waiting is not None:  # replaces a queued change the engine never saw: undo goes back past both
            previous, created, tags = waiting.meta["previous"], waiting.meta["created"], waiting.meta["tags"] + tags
        if prompts.empty and self.is_propagating and set(obj.prompts) <= {key}:
            # removing an object while a propagation tracks it would break the run
            self._say(f"Object {obj_id}'s last prompt cannot go while a propagation runs: cancel it (Esc) or wait.")
            self.on_notify("info", f"napari-sam2: object {obj_id}'s last prompt cannot go while a propagation runs.")
            if tags:
                self.on_restore(tags[-1])
            return
        if prompts.empty:
            obj.prompts.pop(key, None)
        else:
            obj.prompts[key] = prompts
        obj.version += 1
        index = self.slice_index(key)

        def work():
            with seg.lock:
                snap = seg.snapshot(key, obj_id)
                if prompts.mask is not None:
                    return snap, True, seg.set_mask(key, obj_id, prompts.mask, roi=obj.roi)
                if prompts.box is not None:
                    return snap, True, seg.set_box(key, obj_id, prompts.box, list(prompts.points) or None,
                                                   list(prompts.labels) or None, roi=obj.roi)
                if prompts.points:
                    return snap, True, seg.set_points(key, obj_id, list(prompts.points), list(prompts.labels),
                                                      roi=obj.roi)
                return snap, seg.forget_slice(key, obj_id), None

        def done(result):
            snap, exists, mask = result
            if self._running is not None:  # a propagation runs: its undo must go back past this slice too
                self._remember(self._running, index)
            entry = {"kind": kind, "obj": obj_id, "key": key, "snap": snap, "prompts": previous,
                     "created": created, "tags": tags, "before": (index, np.array(self.labels[index], copy=True))}
            if not exists:  # its last prompt in this block went: its labels here go too
                block = seg.block_index(key)
                part = self.labels[block]
                entry["where"] = (block, np.nonzero(np.asarray(part) == obj_id))
                part[entry["where"][1]] = 0
                self.labels[block] = part
                if not obj.prompts:  # no prompt anywhere (other time points included): the object goes
                    entry["removed"] = self.objects.pop(obj_id, None)
                self.on_labels(False)
                self._say(f"Object {obj_id} had no prompt left here, so its labels here were removed.")
            else:
                self._write(index, {obj_id: np.zeros(self.labels[index].shape, bool) if mask is None
                                    else seg.to_data_order(mask)})
                if mask is not None:
                    warning = seg.small_object_warning(mask, prompts.box, roi=obj.roi)
                    if warning:
                        self.on_notify("warning", f"napari-sam2: {warning}")
                        self._say(warning)
            self._push(entry)
            self.on_objects()

        def failed(err):
            # the engine did not take the prompt: the record goes back to what it holds
            if previous is None:
                obj.prompts.pop(key, None)
            else:
                obj.prompts[key] = previous
            if created and not obj.prompts:
                self.objects.pop(obj_id, None)
            self._failed("segmenting the slice")(err)

        job = Job(work, on_result=done, on_error=failed)
        job.meta.update(previous=previous, created=created, tags=tags)
        self.queue.submit((kind, obj_id, key), job)

    # ------------------------------------------------------------------ propagation

    def propagate(self, position: Sequence[int], direction: str = "both", *, objects: Optional[Sequence[int]] = None,
                  frame_range: Optional[Tuple[int, int]] = None, stop_after: Optional[int] = -1,
                  on_slice: Optional[Callable[[], None]] = None, on_end: Optional[Callable[[bool], None]] = None) -> bool:
        """Propagate objects through the slices of the session at ``position``, each from its
        own prompted slices; masks are written as slices come.

        objects: which objects (default: those whose prompts changed since their last
        propagation, or all when none did — a correction re-runs only its object);
        frame_range: (first, last) slices to stay within; stop_after: stop an object after
        that many slices where it is absent (None: never; default: the annotator's
        ``stop_after``); on_slice() after each slice written, on_end(completed) when it ends
        (False: cancelled or failed). It starts once queued prompts are done. Returns
        whether it started.
        """
        seg = self.segmenter
        key = self.slice_key(position)
        try:
            if seg.axis is None:
                raise InputError("this image is 2D: there is no axis to propagate along")
            if self._propagation is not None:
                raise InputError("a propagation is already running")
            if not self.objects:
                raise InputError("give a prompt (a click, a box or a painted mask) before propagating")
            here = self._objects_at(key)
            if not here:
                raise InputError("no object has a prompt at this position (e.g. this time point): give one first")
            if objects is None:
                ids = [o.obj_id for o in here if o.propagated != o.version] or [o.obj_id for o in here]
            else:
                if not objects:
                    raise InputError("no object is selected in the table: select some, or choose 'changed (or all)'")
                missing = [int(o) for o in objects if int(o) not in self.objects]
                if missing:
                    raise InputError(f"no object {missing[0]} to propagate; objects: {sorted(self.objects)}")
                ids = sorted({int(o) for o in objects})
        except InputError as err:
            self.on_notify("error", f"napari-sam2: {err}")
            self._say(str(err))
            return False
        stop = self.stop_after if stop_after == -1 else stop_after
        stop = stop or None
        versions = {i: self.objects[i].version for i in ids}
        entry = {"kind": "propagation", "key": key, "snaps": {}, "slices": {}, "objs": ids, "record": None}
        record = {"position": list(key), "direction": direction, "objects": ids,
                  "frame_range": None if frame_range is None else [int(v) for v in frame_range], "stop_after": stop}
        state = {"error": None}

        def gen():
            with seg.lock:
                entry["snaps"] = {i: seg.snapshot(key, i) for i in ids}
            yield from seg.propagate(key, direction, frame_range=frame_range, obj_ids=ids, stop_after_absent=stop)

        def on_item(item):
            index, masks = item
            self._remember(entry, index)
            self._write(index, masks)
            if on_slice is not None:
                on_slice()

        def on_error(err):
            state["error"] = _message(err)
            self.on_notify("error", f"napari-sam2: propagating failed: {state['error']}")

        def finish():
            job = self._propagation
            self._propagation = self._running = None
            if state["error"] is not None:
                self._say(f"Propagation stopped by an error: {state['error']} Slices done before it are kept.")
            elif job is not None and job.cancelled:
                self._say("Propagation cancelled; slices done so far are kept.")
            else:
                self._clear_skipped(key, ids, entry)
                for i, v in versions.items():
                    if i in self.objects:
                        self.objects[i].propagated = v
                self._say("Propagation finished.")
            completed = state["error"] is None and not (job is not None and job.cancelled)
            if completed and entry["slices"]:
                self.history.append(record)
                entry["record"] = record
            if not entry["slices"] and entry in self._undo:
                self._undo.remove(entry)
            self._report_nonfinite()
            self.on_objects()
            if on_end is not None:
                on_end(completed)

        self._launch(Job(gen, on_yield=on_item, on_error=on_error, on_done=finish), entry,
                     f"Propagating {direction}: objects {', '.join(map(str, ids))}…")
        return True

    def segment_everything(self, position: Sequence[int], *, whole_stack: bool = False,
                           on_progress: Optional[Callable[[int, int], None]] = None,
                           on_end: Optional[Callable[[bool], None]] = None, **params) -> bool:
        """Find every object automatically (:mod:`napari_sam2.model.auto_stack`); each one
        found becomes an ordinary object prompted with its mask, which clicks correct and
        propagation re-runs. Pixels already labelled (the user's or objects') count as taken.

        whole_stack=False: proposals on the slice at ``position`` only (propagate them
        afterwards), within the chosen region if there is one; on a slice more than 1.5 times
        the model's input without one, tile by tile (:mod:`~napari_sam2.model.tiles`), each
        object then tracked on the tile that holds it; True: proposals on that slice and every ``every`` slices, all tracked
        both ways (stopped after ``stop_after`` absent slices unless ``stop_after_absent``
        is given); the objects at this position not yet propagated are tracked first, so
        that proposals do not duplicate them. The key slice is always the one at
        ``position`` (a ``key_slice`` parameter is refused). params:
        :class:`~napari_sam2.model.auto_stack.StackAutoParams` fields and the 2D generator's. on_progress(searched, total) after each slice written;
        on_end(completed). Runs like a propagation: cancel() keeps what is done, and one
        undo takes the whole run back. Returns whether it started.
        """
        from dataclasses import replace

        from .model.auto_stack import (
            AutoEvent,
            auto_segment_session,
            choose_tile,
            split_params,
        )
        from .model.automatic import AutomaticMaskGenerator
        from .model.tiles import (
            assemble,
            default_overlap,
            home_tile,
            tile_pieces,
            tile_regions,
        )

        seg = self.segmenter
        key = self.slice_key(position)
        region = None if self.roi == "auto" else self.roi  # "auto" regions follow prompts: none here
        try:
            if self._propagation is not None:
                raise InputError("a propagation is already running: wait for it or cancel it (Esc)")
            if whole_stack and seg.axis is None:
                raise InputError("this image is 2D: segment this slice instead of the whole stack")
            if "key_slice" in params:
                raise InputError("segment everything starts on the slice at the given position: leave out key_slice")
            params.setdefault("stop_after_absent", self.stop_after or 2)  # auto objects stop where they end
            gen_params, stack_params = split_params(params)
            stack_params = replace(stack_params, key_slice=seg.slice_of(key))
            generator = AutomaticMaskGenerator(seg.model, fast=bool(seg.session_kwargs.get("fast", False)), **gen_params)
        except InputError as err:
            self.on_notify("error", f"napari-sam2: {err}")
            self._say(str(err))
            return False
        with self._ids:  # labels handed out from now on: the run's and any new_object()'s
            self._next_free = max(self._next_free, self.next_label(), self.active + 1)

        handed: List[int] = []  # labels given to the engine by this run

        def next_id() -> int:
            with self._ids:
                i = self._next_free
                while i in self.objects or i == self.active:
                    i += 1
                self._next_free = i + 1
                handed.append(i)
                return i

        def occupied(frame: int) -> np.ndarray:
            return data_to_view(np.asarray(self.labels[seg.label_index(key, frame)]) != 0, self.displayed)

        # objects of this position not yet propagated go with the first round (else the search
        # on other slices would take them for new objects)
        waiting = [o.obj_id for o in self._objects_at(key) if o.propagated != o.version] if whole_stack else []
        entry = {"kind": "auto", "key": key, "slices": {}, "objs": [], "tags": [], "record": None,
                 "snaps": {}, "waiting": waiting}
        state = {"error": None}

        versions = {i: self.objects[i].version for i in waiting}  # what the run propagates
        holder: Dict[str, Job] = {}

        def cancelled() -> bool:
            return holder["job"].cancelled
        rois: Dict[int, Optional[Roi]] = {}  # objects found on tiles: each its own region

        tile = None if whole_stack or region is not None else choose_tile("auto", seg.slice_shape, seg.model.image_size)

        def gen_tiled():
            """A slice much larger than the model's input: proposals tile by tile, and each object
            found is tracked on the tile that holds it (objects of one tile share its session),
            or on a region around its mask (full detail when propagated)."""
            frame = seg.slice_of(key)
            image = np.asarray(seg.view(key)[frame])
            tiles = tile_regions(seg.slice_shape, tile, default_overlap(tile))
            pieces: list = []
            for k, found in tile_pieces(generator, image, seg.intensity_range, stack_params, tiles, cancelled):
                pieces += found
                yield AutoEvent("found", frame, {}, k + 1, len(tiles) + 1)
            if cancelled():
                return
            found, given = {}, {}
            for p in assemble(pieces, tiles, seg.slice_shape, stack_params, taken=occupied(frame)):
                obj_id = next_id()
                mask = np.zeros(seg.slice_shape, bool)
                mask[p.box.slices] = p.mask
                roi = seg.region(home_tile(p.box, tiles)
                                 or region_around(seg.slice_shape, seg.model.image_size, mask=mask))
                rois[obj_id] = roi
                with seg.lock:
                    found[obj_id] = seg.set_mask(key, obj_id, mask, roi=roi)
                given[obj_id] = mask
            yield AutoEvent("found", frame, found, len(tiles) + 1, len(tiles) + 1, given)

        def gen():
            if tile is not None:
                yield from gen_tiled()
                return
            with seg.lock:
                session = seg.session(key, roi=region)
                entry["snaps"] = {i: seg.snapshot(key, i) for i in waiting}
                elsewhere = [i for i in waiting if i not in session.objects]  # e.g. objects on their own regions
            if elsewhere:  # tracked first too, so that the search does not find them again
                for f, masks in seg.propagate(key, "both", obj_ids=elsewhere, view=True,
                                              stop_after_absent=stack_params.stop_after_absent):
                    yield AutoEvent("tracked", f, masks, 0, 1)
                    if cancelled():
                        return
            # the engine lock is taken per slice and per prompt, not while proposals are searched
            yield from auto_segment_session(session, generator, params=stack_params, next_id=next_id,
                                            occupied=occupied, track=whole_stack, existing=waiting, lock=seg.lock,
                                            should_stop=cancelled)

        def on_item(event):
            if on_progress is not None:
                on_progress(event.searched, event.total)
            if not event.masks:
                return
            index = seg.label_index(key, event.frame)
            self._remember(entry, index)
            if event.kind == "found":
                self.ensure_fits(max(event.masks))
                fkey = tuple(event.frame if a == seg.axis else v for a, v in enumerate(key))
                for obj_id, mask in event.prompts.items():
                    obj = self.objects[obj_id] = AnnotatedObject(obj_id, roi=rois.get(obj_id, region))
                    obj.prompts[fkey] = SlicePrompts(mask=mask)
                    obj.version += 1
                    versions[obj_id] = obj.version
                    entry["objs"].append(obj_id)
                self.on_objects()
            self._write(index, {i: seg.to_data_order(m) for i, m in event.masks.items()})
            self._say(f"Segment everything: {len(entry['objs'])} objects found; slice {event.frame}, "
                      f"searched {event.searched} of {event.total} slices for new objects…")

        def on_error(err):
            state["error"] = _message(err)
            self.on_notify("error", f"napari-sam2: segment everything failed: {state['error']}")
            # objects the engine took but the run never reported (it failed between the two) go
            for i in handed:
                if i not in self.objects:
                    seg.take_out(i)

        def finish():
            job = self._propagation
            self._propagation = self._running = None
            cancelled = job is not None and job.cancelled
            completed = state["error"] is None and not cancelled
            found = len(entry["objs"])
            if state["error"] is not None:
                self._say(f"Segment everything stopped by an error: {state['error']} {found} objects found before it are kept.")
            elif cancelled:
                self._say(f"Segment everything cancelled; the {found} objects found so far are kept.")
            else:
                self._say(f"Segment everything found {found} new objects"
                          + (" and tracked them through the stack." if whole_stack else
                             " on this slice: correct them, then propagate (Shift+A)."))
            with self._ids:
                self._next_free = 0  # every label the run gave is an object now (or undone)
            tracked = entry["objs"] + waiting
            if whole_stack and tracked and completed:
                self._clear_skipped(key, tracked, entry)
                for i, v in versions.items():  # a correction made meanwhile still counts as a change
                    if i in self.objects:
                        self.objects[i].propagated = v
                record = {"position": list(key), "direction": "both", "objects": sorted(tracked),
                          "frame_range": None, "stop_after": stack_params.stop_after_absent}
                self.history.append(record)
                entry["record"] = record
            if not entry["slices"] and entry in self._undo:
                self._undo.remove(entry)
            self.active = self.next_label()
            self._report_nonfinite()
            self.on_objects()
            if on_end is not None:
                on_end(completed)

        holder["job"] = Job(gen, on_yield=on_item, on_error=on_error, on_done=finish)
        self._launch(holder["job"], entry, "Segment everything: looking for objects…")
        return True

    def _launch(self, job: Job, entry: dict, status: str) -> None:
        """Start a long run (a propagation, segment everything) once queued prompts are done."""
        self._propagation, self._running = job, entry
        self._push(entry)  # now, so that prompts given during the run are undone before it
        self._say(status)
        if self.queue.busy:  # prompts given before start first (a click's mask is part of the run)
            self.queue.submit(("propagate",), Job(lambda: None, on_result=lambda _: self._start_propagation(job)))
        else:
            self._start_propagation(job)

    def _objects_at(self, key: tuple) -> List[AnnotatedObject]:
        """The objects with a prompt in the session (e.g. the time point) of slice ``key``."""
        block = self.segmenter.key(key)
        return [o for o in self.objects.values() if any(self.segmenter.key(k) == block for k in o.prompts)]

    def _start_propagation(self, job: Job) -> None:
        if job.cancelled:
            job.on_done()
        else:
            self.queue.executor.run(job)

    def cancel(self) -> None:
        """Stop a running propagation; slices already written stay."""
        if self._propagation is not None:
            self._propagation.cancel()

    def _remember(self, entry: dict, index: tuple) -> None:
        k = repr(index)
        if k not in entry["slices"]:
            entry["slices"][k] = (index, np.array(self.labels[index], copy=True))

    def _clear_skipped(self, key: tuple, ids: Sequence[int], entry: dict) -> None:
        """Slices an early stop left out hold no label of that object (an earlier, longer
        propagation may have written some)."""
        changed = False
        for obj, indices in self.segmenter.skipped(key).items():
            if obj in self.user_labels or obj not in ids:
                continue
            for index in indices:
                sl = np.asarray(self.labels[index])
                stale = sl == obj
                if stale.any():
                    self._remember(entry, index)
                    sl = sl.copy()
                    sl[stale] = 0
                    self.labels[index] = sl
                    changed = True
        if changed:
            self.on_labels(False)

    # ------------------------------------------------------------------ undo

    def _push(self, entry: dict) -> None:
        self._undo.append(entry)
        del self._undo[:-UNDO_DEPTH]

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def last_change(self) -> Optional[str]:
        """The kind of change undo would take back ("prompt", "paint", "propagation",
        "delete"), None when there is none."""
        return self._undo[-1]["kind"] if self._undo else None

    def undo(self) -> Optional[str]:
        """Take back the last change: a prompt (click, box, painted mask), a propagation or a
        deletion — its labels, the engine's state and the object table. Returns its kind."""
        if not self._undo:
            self._say("Nothing to undo.")
            return None
        if self.is_busy:
            self._say("Work is running: press Ctrl+Z again when it is done.")
            self.on_notify("info", "napari-sam2: work is running; undo again when it is done.")
            return None
        entry = self._undo.pop()
        seg = self.segmenter

        def work():
            with seg.lock:
                if entry["kind"] == "delete":
                    seg.put_back(entry["obj"].obj_id, entry["snaps"])
                elif entry["kind"] == "propagation":
                    for i, snap in entry["snaps"].items():
                        seg.restore(entry["key"], i, snap)
                elif entry["kind"] == "auto":
                    for i in entry["objs"]:
                        seg.restore(entry["key"], i, None)
                    for i, snap in entry["snaps"].items():
                        seg.restore(entry["key"], i, snap)
                else:
                    seg.restore(entry["key"], entry["obj"], entry["snap"])

        def done(_):
            self._undo_labels(entry)
            self.on_labels(False)
            for t in reversed(entry.get("tags", [])):
                self.on_restore(t)
            self.on_objects()
            what = {"propagation": "the last propagation", "delete": "the deletion of an object",
                    "auto": f"segment everything ({len(entry.get('objs', []))} objects)"}.get(
                entry["kind"], f"the last change to object {entry.get('obj')}")
            self._say(f"Undone: {what}.")

        self.queue.submit(("undo", len(self._undo)), Job(work, on_result=done, on_error=self._failed("undoing")))
        return entry["kind"]

    def _undo_labels(self, entry: dict) -> None:
        kind = entry["kind"]
        if kind == "auto":
            for index, before in reversed(list(entry["slices"].values())):
                self.labels[index] = before
            for i in entry["objs"]:
                self.objects.pop(i, None)
            for i in entry["waiting"]:
                if i in self.objects:
                    self.objects[i].propagated = None
            if entry["record"] is not None and entry["record"] in self.history:
                self.history.remove(entry["record"])
            self.active = self.next_label()
            return
        if kind == "propagation":
            for index, before in entry["slices"].values():
                self.labels[index] = before
            for i in entry["objs"]:
                if i in self.objects:
                    self.objects[i].propagated = None
            if entry["record"] is not None and entry["record"] in self.history:
                self.history.remove(entry["record"])
            return
        if kind == "delete":
            obj = entry["obj"]
            self.labels[entry["where"]] = obj.obj_id
            self.objects[obj.obj_id] = obj
            return
        obj_id, key = entry["obj"], entry["key"]
        index, before = entry["before"]
        self.labels[index] = before
        if "where" in entry:
            block, where = entry["where"]
            part = self.labels[block]
            part[where] = obj_id
            self.labels[block] = part
        obj = entry.get("removed") or self.objects.get(obj_id)
        if obj is None:
            return
        if entry["prompts"] is None:
            obj.prompts.pop(key, None)
        else:
            obj.prompts[key] = entry["prompts"]
        obj.version += 1
        if entry["created"] and not obj.prompts:
            self.objects.pop(obj_id, None)
        elif obj_id not in self.objects:
            self.objects[obj_id] = obj

    # ------------------------------------------------------------------ settings and upkeep

    def set_intensity_range(self, limits: Sequence[float]) -> None:
        """The model sees what the user sees: new contrast limits for slices computed from now on."""
        limits = tuple(float(v) for v in limits)
        if limits == tuple(self.segmenter.intensity_range or ()):
            return
        seg = self.segmenter
        self.queue.submit(("contrast",), Job(lambda: seg.set_intensity_range(limits),
                                             on_error=self._failed("changing the contrast")))
        self._say(f"Contrast {limits[0]:g}..{limits[1]:g}: slices computed from now on use it "
                  "(masks already made keep theirs).")

    def set_fast(self, fast: bool) -> None:
        seg = self.segmenter
        self.queue.submit(("fast",), Job(lambda: seg.set_fast(bool(fast)), on_error=self._failed("changing fast mode")))
        self._say(f"Fast mode {'on (bfloat16)' if fast else 'off (float32)'} for slices computed from now on.")

    def prefetch(self, position: Sequence[int]) -> None:
        """Compute the features of the slice at ``position`` and its neighbours in the background."""
        seg = self.segmenter
        if seg.axis is None or self.is_busy or self.roi == "auto":  # "auto": regions are not known yet
            return
        key = self.slice_key(position)
        s = seg.slice_of(key)
        roi = self.roi
        self.queue.submit(("prefetch",), Job(lambda: seg.prefetch(key, [s, s + 1, s - 1], roi=roi),
                                             on_error=self._failed("preparing slices", quiet=True)))

    def _report_nonfinite(self) -> None:
        for text in self.segmenter.new_messages():  # the embedding store: used, refused or dropped
            self.on_notify("info", f"napari-sam2: {text}")
        news = self.segmenter.new_nonfinite_slices()
        if news:
            where = ", ".join(str(f) for _, f in news[:10]) + (" …" if len(news) > 10 else "")
            self.on_notify("warning", f"napari-sam2: slice(s) {where} hold NaN or infinite values; they were treated "
                                      "as background (the low contrast limit). Replace them in the image to change that.")

    # ------------------------------------------------------------------ save and resume

    def session_record(self, *, labels_file: Optional[Union[str, Path]] = None, labels_axes: Optional[str] = None,
                       image_name: Optional[str] = None) -> dict:
        """The session as a JSON-able dict (see :func:`save_session`)."""
        from . import __version__

        seg = self.segmenter
        objects = []
        for obj in sorted(self.objects.values(), key=lambda o: o.obj_id):
            prompts = []
            for key, p in sorted(obj.prompts.items()):
                item = {"slice": list(key)}
                if p.points:
                    item["points"] = [data_point(key, rc, self.displayed) for rc in p.points]
                    item["labels"] = list(p.labels)
                if p.box is not None:
                    item["box"] = [data_point(key, rc, self.displayed) for rc in p.box]
                if p.mask is not None:
                    item["mask"] = encode_mask(view_to_data(p.mask, self.displayed))
                prompts.append(item)
            item = {"id": obj.obj_id, "hidden": obj.hidden, "prompts": prompts}
            if obj.roi is not None:  # rows and columns of the displayed axes
                item["roi"] = [obj.roi.top, obj.roi.left, obj.roi.bottom, obj.roi.right]
            objects.append(item)
        return {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "napari_sam2": __version__,
            "image": {"name": image_name, "shape": list(self.labels.shape), "dtype": str(np.dtype(seg.image.dtype)),
                      "rgb": bool(seg.rgb)},
            "labels_file": None if labels_file is None else str(labels_file),
            "labels_axes": labels_axes,
            "view": {"axis": seg.axis, "displayed": list(seg.displayed)},
            "model": dict(self.model_info),
            "settings": {
                "intensity_range": None if seg.intensity_range is None else [float(v) for v in seg.intensity_range],
                "orientations": int(seg.orientations),
                "fast": bool(seg.session_kwargs.get("fast", False)),
                "stop_after": self.stop_after,
                "nonfinite": seg.nonfinite,
            },
            "user_labels": sorted(self.user_labels),
            "objects": objects,
            "propagations": list(self.history),
        }

    def save(self, path: Union[str, Path], **record_kwargs) -> Path:
        """Write the session record as JSON (atomically: a temporary file, then renamed)."""
        return save_session(path, self.session_record(**record_kwargs))

    def resume(self, record: Union[dict, str, Path], *, labels: Optional[np.ndarray] = None,
               propagate: bool = False) -> None:
        """Put a saved session's objects and prompts back (each prompted slice is computed
        again). labels: the label image saved with it (its objects' labels are taken over);
        with ``propagate`` the session's propagations run again, in order."""
        if not isinstance(record, dict):
            record = load_session(record)
        try:
            self._resume(record, labels, propagate)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, InputError):
                raise
            raise InputError(f"the session file is damaged or incomplete ({type(err).__name__}: {err})") from None

    def _resume(self, record: dict, labels: Optional[np.ndarray], propagate: bool) -> None:
        shape = tuple(record["image"]["shape"])
        if shape != tuple(self.labels.shape):
            raise InputError(f"the session was saved for an image of shape {shape}; this one is {tuple(self.labels.shape)}")
        view = record.get("view") or {}
        if view.get("axis") != self.axis or tuple(view.get("displayed") or ()) != tuple(self.displayed):
            raise InputError(f"the session propagated along axis {view.get('axis')} with axes {view.get('displayed')} "
                             f"on screen; this one uses axis {self.axis} with {list(self.displayed)}: choose the same")
        ids = {int(item["id"]) for item in record["objects"]}
        if ids & self.user_labels:
            raise InputError(f"objects {sorted(ids & self.user_labels)} of the session are labels already in the "
                             "labels layer; resume into a new labels layer")
        if labels is not None:
            if tuple(labels.shape) != shape:
                raise InputError(f"the saved labels have shape {tuple(labels.shape)}, the session {shape}")
            self.ensure_fits(int(labels.max()) if labels.size else 0)
            saved = np.asarray(labels)
            self.labels[...] = np.where(self.labels == 0, saved, self.labels)
            self.user_labels = self.user_labels | (frozenset(int(v) for v in record.get("user_labels", ())))
            self.on_labels(False)
        chosen = self.roi
        try:
            self._resume_objects(record)
        finally:
            self.roi = chosen  # the resumed objects' regions are theirs, not the next object's
        self.active = self.next_label()
        self.on_objects()
        # the resumed state is where undo starts (its prompts are not changes to take back)
        self.queue.submit(("resumed",), Job(lambda: None, on_result=lambda _r: self._undo.clear()))
        if propagate:
            self._replay(list(record.get("propagations") or []))

    def _resume_objects(self, record: dict) -> None:
        """Each saved object's prompts, given again on its own region."""
        for item in record["objects"]:
            obj_id = int(item["id"])
            self.roi = None if item.get("roi") is None else self.segmenter.region(item["roi"])  # its own region
            for p in item["prompts"]:
                key = self.slice_key(p["slice"])
                if "mask" in p:
                    mask = data_to_view(decode_mask(p["mask"]), self.displayed)
                    self._apply(key, obj_id, SlicePrompts(mask=mask), kind="paint")
                else:
                    pts = [point_rc(c, self.displayed) for c in p.get("points", [])]
                    box = p.get("box")
                    self.set_prompts(key, obj_id, points=pts, labels=p.get("labels", []),
                                     box=None if box is None else [point_rc(c, self.displayed) for c in box])
            if item.get("hidden") and obj_id in self.objects:
                self.objects[obj_id].hidden = True

    def _replay(self, runs: List[dict]) -> None:
        """Run recorded propagations one after another (each starts when the last ends)."""
        while runs:
            run = runs.pop(0)
            ids = [i for i in run.get("objects", []) if i in self.objects]
            if not ids:
                continue
            fr = run.get("frame_range")
            self.propagate(run["position"], run.get("direction", "both"), objects=ids,
                           frame_range=None if fr is None else tuple(fr), stop_after=run.get("stop_after"),
                           on_end=lambda completed: completed and self._replay(runs))
            return


# ---------------------------------------------------------------------- the session file


def encode_mask(mask: np.ndarray) -> dict:
    """A boolean mask as run lengths over its C-order pixels, starting with a background run."""
    flat = np.asarray(mask, bool).ravel()
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"shape": list(mask.shape), "runs": [int(r) for r in runs]}


def decode_mask(rle: dict) -> np.ndarray:
    """The inverse of :func:`encode_mask`."""
    shape = tuple(int(v) for v in rle["shape"])
    runs = np.asarray(rle["runs"], np.int64)
    if runs.sum() != int(np.prod(shape)):
        raise InputError(f"a saved mask's runs cover {int(runs.sum())} pixels, its shape {shape} needs {int(np.prod(shape))}")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(shape)


def save_session(path: Union[str, Path], record: dict) -> Path:
    """Write a session record as JSON, atomically."""
    from .files import atomic_write_text

    return atomic_write_text(path, json.dumps(record, indent=1), what="the session")


def load_session(path: Union[str, Path]) -> dict:
    """Read and check a session file written by :func:`save_session`."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no session file {path}") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not a readable session file: {err}") from None
    if not isinstance(record, dict) or record.get("format") != SESSION_FORMAT:
        raise InputError(f"{path} is not a napari-sam2 session file")
    if int(record.get("version", 0)) > SESSION_VERSION:
        raise InputError(f"{path} was written by a newer napari-sam2 (format {record['version']}); update napari-sam2")
    return record


def session_path(labels_path: Union[str, Path]) -> Path:
    """The session file saved beside a label TIFF: ``labels.tif`` -> ``labels.sam2.json``."""
    from .io import stem_of

    p = Path(labels_path)
    return p.with_name(stem_of(p) + ".sam2.json")
