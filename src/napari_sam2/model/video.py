"""Segment objects through a z-stack or time series: the stack session.

Example::

    session = StackSession(model, volume, intensity_range=(100, 3000))
    session.add_points(frame=20, obj_id=1, points=[[64, 80]], labels=[1])
    for z, masks in session.propagate("both"):
        labels[z][masks[1]] = 1

Slices are "frames" in SAM 2's terms. Coordinates are (x, y) pixels of a slice.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import (
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
import torch.nn.functional as F

from .devices import autocast_context
from .frames import FrameSource
from .geometry import mask_to_model
from .postprocess import fill_holes, non_overlapping
from .preprocess import InputError
from .prompts import check_mask, slice_prompt
from .sam2 import LOGIT_CLAMP, NO_OBJ_SCORE, FrameFeatures, SAM2Model
from .tracking import (
    FrameOutput,
    MemoryBank,
    PointPrompt,
    Sweep,
    Tracker,
    encode_memory,
    plan_sweeps,
    upsample_to_model,
)

__all__ = ["FeatureCache", "ObjectState", "SessionCommon", "StackSession", "Sweep", "check_frame", "largest_slices",
           "run_sweeps"]


def check_frame(frame: int, num_frames: int) -> int:
    """``frame`` as an int, or an InputError when it is not a slice of a stack of ``num_frames``."""
    if not isinstance(frame, (int, np.integer)) or not 0 <= int(frame) < num_frames:
        raise InputError(f"slice {frame} is outside the stack (0..{num_frames - 1})")
    return int(frame)


class SliceMasks(Mapping):
    """{obj_id: H x W mask or logits} of one slice, each upsampled from the model's
    low-resolution logits when first read. A prompt returns every object's mask on its slice,
    and a caller that reads only its own object's (giving hundreds of clicks on a large frame)
    then pays for one upsampling, not one per object on the slice."""

    def __init__(self, low_res: torch.Tensor, obj_ids: Sequence[int], shape: Tuple[int, int],
                 return_logits: bool) -> None:
        self._low = low_res.float()
        self._rows = {int(oid): i for i, oid in enumerate(obj_ids)}
        self._shape, self._logits = tuple(shape), return_logits
        self._done: Dict[int, np.ndarray] = {}

    def __getitem__(self, obj_id) -> np.ndarray:
        key = int(obj_id)
        if key not in self._done:
            row = self._low[self._rows[key]][None]  # KeyError for an unknown object, as a dict
            full = F.interpolate(row, size=self._shape, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
            self._done[key] = full if self._logits else full > 0
        return self._done[key]

    def __iter__(self):
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def low_res_to_slice(
    low_res: torch.Tensor, obj_ids: Sequence[int], shape: Tuple[int, int], non_overlap: bool, return_logits: bool
) -> Mapping[int, np.ndarray]:
    """B 1 4h 4w logits (one row per object) -> {obj_id: H x W mask or logits} (upsampled as
    read, unless objects must not overlap: then all at once)."""
    if not non_overlap:
        return SliceMasks(low_res, obj_ids, shape, return_logits)
    full = non_overlapping(F.interpolate(low_res.float(), size=tuple(shape), mode="bilinear", align_corners=False))
    full = full[:, 0].cpu().numpy()
    return {oid: (full[i] if return_logits else full[i] > 0) for i, oid in enumerate(obj_ids)}


def run_sweeps(session, sweeps: Sequence[Sweep], step, stop_after_absent: Optional[int] = None):
    """Drive ``step(frame, obj_ids, reverse) -> (B 1 h w logits, B scores)`` through the
    sweeps; yields (frame, obj_ids, logits, scores). An object stops in a sweep after
    ``stop_after_absent`` consecutive slices with a non-positive object score; the slices
    it then leaves out are recorded as skipped (``session.objects[i].skipped``)."""
    if stop_after_absent is not None and int(stop_after_absent) < 1:
        raise InputError(f"stop_after_absent must be at least 1 (or None: never stop), got {stop_after_absent}")
    # the objects as planned: one removed, replaced or restored meanwhile (a user's edit
    # during the propagation) leaves the sweep instead of being tracked with another state
    planned = {i: session.objects.get(i) for s in sweeps for i in s.starts}
    for sweep in sweeps:
        absent = dict.fromkeys(sweep.starts, 0)
        stopped: set = set()
        frames = sweep.frames
        for i in sweep.starts:
            if planned[i] is not None:
                planned[i].skipped.difference_update(f for f in frames if sweep.active(f, i))
        for frame in frames:
            ids = [i for i in sweep.starts if sweep.active(frame, i) and planned[i] is not None
                   and session.objects.get(i) is planned[i]]
            for i in ids:  # an object's own prompted slice takes it up again after a stop
                if i in stopped and (frame in planned[i].memory.cond or frame in planned[i].pending.cond):
                    stopped.discard(i)
                    absent[i] = 0
            for i in [i for i in ids if i in stopped]:
                planned[i].skipped.add(frame)
            ids = [i for i in ids if i not in stopped]
            if not ids:
                continue
            low, scores = step(frame, ids, sweep.reverse)
            if stop_after_absent is not None:
                for i, sc in zip(ids, scores.tolist()):
                    absent[i] = absent[i] + 1 if sc <= 0 else 0
                    if absent[i] >= stop_after_absent:
                        stopped.add(i)
            yield frame, ids, low, scores


class FeatureCache:
    """Image features of recently used slices, bounded by a byte budget (LRU)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[int, FrameFeatures]" = OrderedDict()
        self.nbytes = 0

    def get(self, key: int) -> Optional[FrameFeatures]:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: int, feats: FrameFeatures) -> None:
        if key in self._items:
            self.nbytes -= self._items.pop(key).nbytes
        self._items[key] = feats
        self.nbytes += feats.nbytes
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def __len__(self) -> int:
        """How many slices' features are cached."""
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


@dataclass
class ObjectState:
    """Everything the session knows about one object: its prompts, its memory bank, and the
    outputs of prompts given since the last propagation (``pending``: their memories are
    encoded when the next propagation starts)."""

    obj_id: int
    points: Dict[int, PointPrompt] = field(default_factory=dict)
    masks: Dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> 1 1 S S mask prompt
    memory: MemoryBank = field(default_factory=MemoryBank)
    pending: MemoryBank = field(default_factory=MemoryBank)
    tracked: Dict[int, bool] = field(default_factory=dict)  # frame -> tracked in reverse?
    skipped: set = field(default_factory=set)  # frames the last propagation left out (early stop)

    def latest(self, frame: int) -> Optional[FrameOutput]:
        out = self.pending.get(frame)
        return out if out is not None else self.memory.get(frame)

    @property
    def prompted_frames(self) -> List[int]:
        return sorted(set(self.points) | set(self.masks))

    def copy(self) -> "ObjectState":
        """A copy whose prompt and memory tables can change without touching this one."""
        return ObjectState(
            self.obj_id, dict(self.points), dict(self.masks), self.memory.copy(), self.pending.copy(),
            dict(self.tracked), set(self.skipped),
        )


class SessionCommon:
    """What every session kind (a :class:`StackSession`, an ensemble of them) builds on its
    own ``add_mask`` and ``propagate_logits``: propagation into masks, and prompts from
    existing label images (a 2D result of StarDist or Cellpose, or an old 3D segmentation:
    each nonzero label becomes the mask prompt of the object with that id).
    """

    def propagate(
        self,
        direction: str = "both",
        *,
        stop_after_absent: Optional[int] = None,
        return_logits: bool = False,
        **plan_kwargs,
    ) -> Iterator[Tuple[int, Dict[int, np.ndarray]]]:
        """Track objects from their prompted slices; yields (slice, {obj_id: mask}).

        direction: "forward" (increasing index), "backward" or "both". Each object
        is tracked from its own first prompted slice; plan_kwargs, as
        :meth:`StackSession.plan` takes them: start (one first slice for all objects
        instead), frame_range ((first, last) inclusive slices to stay within),
        object_ranges ({obj_id: (first, last)}), obj_ids (track only these objects).
        stop_after_absent: stop tracking an object in a direction after this many
        consecutive slices where the model says it is absent (None: never); the slices
        left out are listed by ``skipped_frames`` and a later propagation can still fill them.
        Each yielded dict holds the objects computed on that slice. All objects that
        step on a slice go through the model as one batch. Stop iterating at any
        time: slices already yielded stay valid, and the session can propagate again.
        """
        logits = self.propagate_logits(direction, stop_after_absent=stop_after_absent, **plan_kwargs)
        for frame, ids, low, _scores in logits:
            yield frame, low_res_to_slice(low, ids, (self.height, self.width), self.non_overlap, return_logits)

    def add_labels(self, frame: int, label_slice, *, return_logits: bool = False) -> Dict[int, np.ndarray]:
        """Every nonzero label on one slice (H x W integers) becomes the mask prompt of the
        object with that id; returns the slice's masks as :meth:`add_mask` does."""
        lab = np.asarray(label_slice)
        if lab.shape != (self.height, self.width):
            raise InputError(f"the label slice must have the slice's shape {(self.height, self.width)}, got {lab.shape}")
        if not np.issubdtype(lab.dtype, np.integer):
            raise InputError(f"labels must be integers (0 background, 1, 2, ... objects), got dtype {lab.dtype}")
        ids = [int(i) for i in np.unique(lab) if i > 0]
        if not ids:
            raise InputError(f"the label slice {frame} holds no object (only background 0)")
        out: Dict[int, np.ndarray] = {}
        for i in ids:
            out = self.add_mask(frame, i, lab == i, return_logits=return_logits)
        return out

    def add_label_volume(self, labels) -> Dict[int, int]:
        """Each object of a label volume (N x H x W, the stack's shape) is prompted with its
        mask on the slice where it is largest; returns {obj_id: that slice}."""
        vol = np.asarray(labels)
        chosen = largest_slices(vol, (self.num_frames, self.height, self.width))
        for i, frame in chosen.items():
            self.add_mask(frame, i, vol[frame] == i)
        return chosen


def largest_slices(labels, shape: Tuple[int, int, int]) -> Dict[int, int]:
    """{label: the slice where it is largest} of a label volume, checked to be integers of
    ``shape`` (the stack's N x H x W) holding at least one object; labels in increasing order."""
    vol = np.asarray(labels)
    if vol.shape != tuple(shape):
        raise InputError(f"the label volume must have the stack's shape {tuple(shape)}, got {vol.shape}")
    if not np.issubdtype(vol.dtype, np.integer):
        raise InputError(f"labels must be integers (0 background, 1, 2, ... objects), got dtype {vol.dtype}")
    values, inverse = np.unique(vol, return_inverse=True)
    inverse = inverse.reshape(vol.shape[0], -1)
    areas = np.stack([np.bincount(row, minlength=len(values)) for row in inverse])  # slices x ids
    if not (values > 0).any():
        raise InputError("the label volume holds no object (only background 0)")
    return {int(i): int(np.argmax(areas[:, k])) for k, i in enumerate(values.tolist()) if i > 0}


class StackSession(SessionCommon):
    """Interactive tracking of objects through the slices of a stack.

    model: a loaded :class:`SAM2Model` (its device is the compute device).
    frames: a :class:`FrameSource` or any array-like (N, H, W) / (N, H, W, C).
    intensity_range: black..white mapping for all slices (ignored for a FrameSource).
    fill_hole_area: fill background specks up to this many low-res pixels (the
    reference's default is 8). non_overlap: keep objects from overlapping.
    corrections_as_conditioning: prompts on an already tracked slice make it a
    conditioning slice, kept when propagating again (the reference keeps it only
    in memory; False reproduces that). feature_cache_mb: byte budget for cached
    slice features. offload_state: keep memories on the CPU while computing on
    a GPU. fast: bfloat16 autocast. compute_features: ``frame -> FrameFeatures``
    called when a slice's features are not cached (default :meth:`encode_frame`;
    an ensemble encodes all its orientations in one batch this way). keep_memory: keep
    every slice's memory instead of dropping what the model can no longer attend to (the
    results are the same; for checks, at the cost of memory on long stacks).
    """

    def __init__(
        self,
        model: SAM2Model,
        frames: Union[FrameSource, "np.ndarray"],
        *,
        intensity_range: Optional[Sequence[float]] = None,
        fill_hole_area: int = 8,
        non_overlap: bool = False,
        corrections_as_conditioning: bool = False,
        feature_cache_mb: float = 256,
        offload_state: bool = False,
        fast: bool = False,
        compute_features: Optional[Callable[[int], FrameFeatures]] = None,
        keep_memory: bool = False,
    ) -> None:
        self.model = model.eval()
        self.frames = FrameSource.for_model(model, frames, intensity_range)
        self.num_frames = len(self.frames)
        self.height, self.width = self.frames.shape
        self.fill_hole_area = int(fill_hole_area)
        self.non_overlap = non_overlap
        self.corrections_as_conditioning = corrections_as_conditioning
        self.device = model.device
        self.storage_device = torch.device("cpu") if offload_state else self.device
        self.fast = fast
        self.features = FeatureCache(int(feature_cache_mb * 2**20))
        self._compute_features = compute_features
        self.objects: "OrderedDict[int, ObjectState]" = OrderedDict()
        self._tracker = Tracker(model, self.num_frames)
        self.keep_memory = bool(keep_memory)

    # ------------------------------------------------------------------ basics

    @property
    def obj_ids(self) -> List[int]:
        return list(self.objects)

    def _amp(self):
        return autocast_context(self.device, torch.bfloat16 if self.fast else None)

    def _object(self, obj_id: int, create: bool = False) -> ObjectState:
        obj_id = int(obj_id)
        if obj_id not in self.objects:
            if not create:
                raise InputError(f"unknown object id {obj_id}; known objects: {self.obj_ids or 'none yet'}")
            self.objects[obj_id] = ObjectState(obj_id)
        return self.objects[obj_id]

    def frame_features(self, frame: int) -> FrameFeatures:
        """Features of one slice (computed once, then cached within the budget)."""
        frame = check_frame(frame, self.num_frames)
        feats = self.features.get(frame)
        if feats is None:
            feats = self.encode_frame(frame) if self._compute_features is None else self._compute_features(frame)
            self.features.put(frame, feats)
        return feats

    def use_features(self, compute_features: Optional[Callable[[int], FrameFeatures]]) -> None:
        """Where slice features come from from now on (None: the image encoder); the cache is
        dropped (e.g. an embedding store that no longer matches the intensity mapping)."""
        self._compute_features = compute_features
        self.features.clear()

    def encode_frame(self, frame: int) -> FrameFeatures:
        """Features of one slice through the model's image encoder (float32, not cached)."""
        x = self.frames.model_input(frame, self.model.image_size).to(self.device)
        with torch.inference_mode(), self._amp():
            feats = self.model.frame_features(self.model.normalize(x))
        return FrameFeatures(feats.image_embed.float(), [h.float() for h in feats.high_res], feats.pos.float())

    def prefetch(self, frames: Sequence[int]) -> None:
        """Compute features ahead (e.g. the slices next to the one on screen)."""
        for f in frames:
            if 0 <= f < self.num_frames and f not in self.features:
                self.frame_features(f)

    # ------------------------------------------------------------------ prompts

    @torch.inference_mode()
    def add_points(
        self,
        frame: int,
        obj_id: int,
        points=None,
        labels=None,
        box=None,
        *,
        clear: bool = True,
        return_logits: bool = False,
    ) -> Dict[int, np.ndarray]:
        """Add clicks and/or a box for one object on one slice; returns the slice's masks.

        points: N x 2 (x, y); labels: N (1 positive, 0 negative); box: (x0, y0, x1, y1).
        clear=False adds the clicks to this slice's earlier ones (not with a box).
        Returns {object id: H x W bool mask (or float logits)} for every object on this slice.
        """
        frame = check_frame(frame, self.num_frames)
        pts, lab = slice_prompt(points, labels, box, (self.height, self.width), self.model.image_size, clear=clear)
        return self._to_slice(self.add_model_points(frame, obj_id, pts, lab, clear=clear), return_logits)

    @torch.inference_mode()
    def add_model_points(self, frame: int, obj_id: int, coords: np.ndarray, labels: np.ndarray, *, clear: bool = True) -> torch.Tensor:
        """:meth:`add_points` with a checked prompt already on the model's input: coords N x 2
        (x, y), labels N (1, 0; 2 and 3 for a box's corners, first). Returns the slice's
        B 1 4h 4w low-resolution logits, one row per object (``obj_ids`` order), on the CPU."""
        frame = check_frame(frame, self.num_frames)
        obj = self._object(obj_id, create=True)
        new = PointPrompt(
            torch.from_numpy(np.array(coords, np.float32)[None]).to(self.device),  # 1 N 2
            torch.from_numpy(np.asarray(labels).astype(np.int32)[None]).to(self.device),  # 1 N
        )
        old = obj.points.get(frame)
        obj.skipped.discard(frame)
        prompt = new if (clear or old is None) else old.extended(new.coords, new.labels)
        obj.points[frame] = prompt
        obj.masks.pop(frame, None)
        return self._run_prompted(obj, frame, prompt=prompt, mask=None)

    @torch.inference_mode()
    def add_mask(self, frame: int, obj_id: int, mask, *, return_logits: bool = False) -> Dict[int, np.ndarray]:
        """Give an object's mask on one slice (H x W, bool or 0/1); returns the slice's masks."""
        frame = check_frame(frame, self.num_frames)
        t = mask_to_model(check_mask(mask, (self.height, self.width)), self.model.image_size, self.device)
        return self._to_slice(self.add_model_mask(frame, obj_id, t), return_logits)

    @torch.inference_mode()
    def add_model_mask(self, frame: int, obj_id: int, mask: torch.Tensor) -> torch.Tensor:
        """:meth:`add_mask` with a checked mask already at the model's input size (1 1 S S,
        float 0 / 1); returns the slice's logits as :meth:`add_model_points` does."""
        frame = check_frame(frame, self.num_frames)
        obj = self._object(obj_id, create=True)
        obj.skipped.discard(frame)
        obj.masks[frame] = mask.to(self.device)
        obj.points.pop(frame, None)
        return self._run_prompted(obj, frame, prompt=None, mask=obj.masks[frame])

    def _run_prompted(self, obj: ObjectState, frame: int, *, prompt, mask) -> torch.Tensor:
        is_init = frame not in obj.tracked
        reverse = False if is_init else obj.tracked[frame]
        is_cond = is_init or self.corrections_as_conditioning
        prev = None
        if prompt is not None:
            earlier = (obj.pending.cond if is_cond else obj.pending.non_cond).get(frame)
            if earlier is None:
                earlier = obj.memory.get(frame)
            if earlier is not None and earlier.pred_masks is not None:
                prev = earlier.pred_masks.to(self.device).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        _, heads = self._step(obj, frame, reverse, is_init=is_init, prompt=prompt, mask=mask, prev=prev)
        out = self._compact(heads.low_res_masks, heads.obj_ptr, heads.object_score_logits, None)
        obj.pending.add(frame, out, prompted=is_cond)
        return self.frame_logits(frame)

    def _compact(self, low_res, obj_ptr, score, maskmem, filled: bool = False) -> FrameOutput:
        if not filled:
            low_res = fill_holes(low_res.float(), self.fill_hole_area)
        st = self.storage_device
        return FrameOutput(
            pred_masks=low_res.to(st),
            obj_ptr=obj_ptr.float().to(st),
            object_score_logits=score.float().to(st),
            maskmem_features=None if maskmem is None else maskmem.to(torch.bfloat16).to(st),
        )

    def frame_logits(self, frame: int) -> torch.Tensor:
        """The latest B 1 4h 4w low-resolution logits of every object on one slice (one row
        per object, ``obj_ids`` order; "absent" where nothing is known), on the CPU."""
        side = 4 * self.model.config.embedding_size
        lows = []
        for obj in self.objects.values():
            out = obj.latest(frame)
            if out is None or out.pred_masks is None:  # nothing known for this object here
                lows.append(torch.full((1, 1, side, side), NO_OBJ_SCORE))
            else:
                lows.append(out.pred_masks.float().cpu())
        return torch.cat(lows, dim=0) if lows else torch.empty((0, 1, side, side))

    def _to_slice(self, low_res: torch.Tensor, return_logits: bool) -> Dict[int, np.ndarray]:
        """B 1 4h 4w logits of every object -> {obj_id: H x W mask or logits}."""
        if not len(low_res):
            return {}
        return low_res_to_slice(low_res, list(self.objects), (self.height, self.width), self.non_overlap, return_logits)

    # ------------------------------------------------------------------ editing

    @torch.inference_mode()
    def clear_frame(self, frame: int, obj_id: int) -> None:
        """Forget one object's prompts on one slice (its tracked result stays as memory)."""
        frame = check_frame(frame, self.num_frames)
        obj = self._object(obj_id)
        obj.points.pop(frame, None)
        obj.masks.pop(frame, None)
        obj.pending.cond.pop(frame, None)
        obj.pending.non_cond.pop(frame, None)
        out = obj.memory.cond.pop(frame, None)
        if out is not None:
            obj.memory.add(frame, out, prompted=False)
            obj.tracked.pop(frame, None)

    def remove_object(self, obj_id: int) -> None:
        """Drop an object and everything the session holds for it."""
        self._object(obj_id)
        del self.objects[int(obj_id)]

    def reset(self) -> None:
        """Drop all objects and prompts (cached slice features are kept)."""
        self.objects.clear()

    def snapshot(self, obj_id: int) -> Optional[ObjectState]:
        """What the session holds for one object (None if it does not exist), for :meth:`restore`."""
        obj = self.objects.get(int(obj_id))
        return None if obj is None else obj.copy()

    def restore(self, obj_id: int, snapshot: Optional[ObjectState]) -> None:
        """Put an object back as :meth:`snapshot` saw it (None: remove it), e.g. to undo a prompt."""
        if snapshot is None:
            self.objects.pop(int(obj_id), None)
        else:
            self.objects[int(obj_id)] = snapshot.copy()

    def clear_features(self) -> None:
        """Forget cached slice features (e.g. after the intensity mapping changed)."""
        self.features.clear()

    # ------------------------------------------------------------------ propagation

    def _commit_pending(self) -> None:
        """Encode memories of prompted slices and move them into the memory bank."""
        if not self.objects:
            raise InputError("no object has a prompt yet: add points, a box or a mask first")
        for obj in self.objects.values():
            for prompted, pending in ((False, obj.pending.non_cond), (True, obj.pending.cond)):
                for frame, out in pending.items():
                    if out.maskmem_features is None:
                        feats = self.frame_features(frame)
                        with self._amp():
                            high = upsample_to_model(self.model, out.pred_masks.to(self.device))
                            mem = encode_memory(self.model, feats, high, out.object_score_logits.to(self.device), from_clicks=True)
                        out.maskmem_features = mem.to(torch.bfloat16).to(self.storage_device)
                    obj.memory.add(frame, out, prompted=prompted)
            obj.pending.clear()
            if not obj.memory.cond:
                raise InputError(f"object {obj.obj_id} has no prompt on any slice; add one or remove the object")

    def plan(
        self,
        direction: str = "both",
        *,
        start: Optional[int] = None,
        frame_range: Optional[Tuple[int, int]] = None,
        obj_ids: Optional[Sequence[int]] = None,
        object_ranges: Optional[Dict[int, Tuple[int, int]]] = None,
    ) -> List["Sweep"]:
        """The sweeps a propagation makes: which objects step on which slices, in order.

        Without ``start`` every object is tracked from its own anchor, its first
        prompted slice inside the range: forward from the anchor, backward from it
        ("backward"), or backward from the slice before it ("both", whose forward
        sweep already gave the anchor). With ``start`` every object starts there (the
        reference's semantics). ``object_ranges`` limits objects to (first, last) slices.
        """
        if direction not in ("forward", "backward", "both"):
            raise InputError(f"direction must be 'forward', 'backward' or 'both', got {direction!r}")
        lo, hi = 0, self.num_frames - 1
        if frame_range is not None:
            lo, hi = (check_frame(int(v), self.num_frames) for v in frame_range)
            if hi < lo:
                raise InputError(f"frame_range must be (first, last) with first <= last, got {frame_range}")
        ids = self.obj_ids if obj_ids is None else [int(i) for i in obj_ids]
        for i in ids:
            self._object(i)  # unknown ids are refused with a clear message
        if start is not None:
            start = check_frame(start, self.num_frames)
        limits: Dict[int, Tuple[int, int]] = {}
        anchors: Dict[int, int] = {}
        for i in ids:
            a, b = lo, hi
            if object_ranges and i in object_ranges:
                a, b = (int(v) for v in object_ranges[i])
                a, b = max(a, lo), min(b, hi)
            own = [t for t in self.objects[i].memory.cond if a <= t <= b]
            anchor = start if start is not None else (min(own) if own else None)
            if anchor is None or not a <= anchor <= b:
                continue  # no prompt of this object inside its range: not tracked now
            limits[i], anchors[i] = (a, b), anchor
        if not anchors:
            raise InputError(f"no prompted slice inside the range {lo}..{hi} for the objects asked for")
        return plan_sweeps(anchors, limits, direction)

    def propagate_logits(self, direction: str = "both", *, stop_after_absent: Optional[int] = None, **plan_kwargs):
        """As :meth:`propagate`, yielding (slice, obj_ids, B 1 4h 4w low-resolution logits,
        B object-score logits) on the CPU instead of masks."""
        with torch.inference_mode():
            self.commit()
            sweeps = self.plan(direction, **plan_kwargs)
        yield from run_sweeps(self, sweeps, self.step, stop_after_absent)

    def commit(self) -> None:
        """Encode the memories of prompted slices (done by every propagation)."""
        with torch.inference_mode():
            self._commit_pending()

    def step(self, frame: int, obj_ids: Sequence[int], reverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Track ``obj_ids`` on one slice (prompted slices keep their result): returns
        (B 1 4h 4w low-resolution logits, B object-score logits), on the CPU.
        Objects that step together go through the model as one batch."""
        frame = check_frame(frame, self.num_frames)
        objs = [self.objects[i] for i in obj_ids]
        lows: List[Optional[torch.Tensor]] = [None] * len(objs)
        scores: List[Optional[torch.Tensor]] = [None] * len(objs)
        todo = []
        for k, obj in enumerate(objs):
            kept = obj.memory.cond.get(frame)
            if kept is not None:  # prompted slice: keep its result
                lows[k], scores[k] = kept.pred_masks, kept.object_score_logits
            else:
                todo.append(k)
        with torch.inference_mode():
            feats = self.frame_features(frame) if todo else None
            for first in range(0, len(todo), self.max_batch):
                chunk = todo[first : first + self.max_batch]
                with self._amp():
                    heads, mem = self._tracker.step_many([objs[k].memory for k in chunk], feats, frame, reverse)
                low_res = fill_holes(heads.low_res_masks.float(), self.fill_hole_area)
                for j, k in enumerate(chunk):
                    out = self._compact(low_res[j : j + 1], heads.obj_ptr[j : j + 1],
                                        heads.object_score_logits[j : j + 1], mem[j : j + 1], filled=True)
                    objs[k].memory.add(frame, out, prompted=False)
                    lows[k], scores[k] = out.pred_masks, out.object_score_logits
            for obj in objs:
                obj.tracked[frame] = reverse
                if not self.keep_memory:  # drop what the model can no longer attend to
                    obj.memory.forget_behind(frame, reverse, self._tracker.window)
            low = torch.cat([t.float().cpu() for t in lows])
            score = torch.cat([t.float().cpu().reshape(1) for t in scores])
        return low, score

    def _step(self, obj: ObjectState, frame: int, reverse: bool, *, is_init=False, prompt=None, mask=None, prev=None):
        """One prompted step of ``obj`` on ``frame``: (frame features, heads output)."""
        feats = self.frame_features(frame)
        with self._amp():
            heads = self._tracker.step(obj.memory, feats, frame, reverse=reverse, first=is_init, prompt=prompt,
                                       mask_input=mask, prev_mask_logits=prev)
        return feats, heads

    #: at most this many objects go through the model in one batch (bounds peak memory)
    max_batch = 16

    def skipped_frames(self, obj_id: int) -> List[int]:
        """Slices the last propagation of ``obj_id`` left out (stopped early): empty there."""
        obj = self._object(obj_id)
        return sorted(obj.skipped - set(obj.prompted_frames))

    # ------------------------------------------------------------------ accounting

    @property
    def state_nbytes(self) -> int:
        """Bytes held in per-object memories (not counting the feature cache)."""
        return sum(out.nbytes for o in self.objects.values() for bank in (o.memory, o.pending) for out in bank.outputs())
