"""Track through a stack in several orientations at once and average them.

Example::

    session = EnsembleSession(model, volume, orientations=8)
    session.add_points(frame=20, obj_id=1, points=[[64, 80]], labels=[1])
    for z, masks in session.propagate("both"):
        labels[z][masks[1]] = 1

A square slice has eight symmetries: four rotations by 90 degrees, each with and
without a mirror image. The model, trained with rotations and flips as
augmentation, makes different mistakes in each. :class:`EnsembleSession` runs
one :class:`~napari_sam2.model.video.StackSession` per orientation, each with its
own memory, gives every one the same prompts (mapped onto its view), and returns
the mean of their mask logits mapped back (test-time augmentation), using only
their public methods. Both offer the :class:`~napari_sam2.model.session.Session`
interface. With all eight orientations the result is exactly equivariant:
rotating or mirroring the stack and the prompts rotates or mirrors the masks.
Cost: one tracker per orientation; the slices' features are computed for all
orientations in one batch.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .config import ORIENTATION_CHOICES
from .devices import autocast_context
from .frames import FrameSource
from .geometry import mask_to_model, orient, orient_xy, unorient
from .preprocess import InputError
from .prompts import BOX_LABELS, check_mask, slice_prompt
from .sam2 import LOGIT_CLAMP, FrameFeatures, SAM2Model
from .session import Session
from .video import (
    SessionCommon,
    StackSession,
    check_frame,
    low_res_to_slice,
    run_sweeps,
)

__all__ = [
    "ORIENTATIONS", "ORIENTATION_CHOICES", "EnsembleSession", "OrientedFrames",
    "check_orientations", "default_orientations", "open_session", "orient", "orient_xy", "unorient",
]

# (quarter turns, then mirror left-right); any first 2 or 4 are a subgroup
ORIENTATIONS: Tuple[Tuple[int, bool], ...] = (
    (0, False), (2, False), (1, True), (3, True), (1, False), (3, False), (0, True), (2, True),
)


def check_orientations(orientations) -> int:
    """``orientations`` as an int, or an InputError naming the allowed values."""
    if orientations not in ORIENTATION_CHOICES:
        raise InputError(f"orientations must be one of {ORIENTATION_CHOICES}, got {orientations!r}")
    return int(orientations)


def open_session(model: SAM2Model, frames, *, orientations: int = 1, roi=None, **session_kwargs) -> Session:
    """A :class:`StackSession` for 1 orientation (plain SAM 2), else an :class:`EnsembleSession`;
    with ``roi`` (a :class:`~napari_sam2.model.roi.Roi`), that session on the region only,
    in the whole slice's coordinates (:class:`~napari_sam2.model.roi.RoiSession`)."""
    if roi is not None:
        from .roi import RoiSession

        return RoiSession(model, frames, roi, orientations=orientations, **session_kwargs)
    if check_orientations(orientations) == 1:
        return StackSession(model, frames, **session_kwargs)
    return EnsembleSession(model, frames, orientations=orientations, **session_kwargs)


def default_orientations(model_name: Optional[str]) -> int:
    """What the widget and the command line start with for a model: its profile's (8 for the
    bundled nano model, 1 (plain SAM 2) for Meta's models); 1 for an unknown name."""
    from .config import MODELS

    cfg = MODELS.get(model_name) if model_name else None
    return 1 if cfg is None else cfg.profile.orientations


# logits are clamped (to LOGIT_CLAMP) before averaging, so one confident member cannot
# outvote the rest


class OrientedFrames(FrameSource):
    """The slices of a :class:`FrameSource` seen in one orientation."""

    def __init__(self, base: FrameSource, k: int, flip: bool) -> None:
        # no FrameSource.__init__: everything is the base's
        self.base, self.k, self.flip = base, int(k) % 4, bool(flip)
        self.frames, self.dtype, self.num_frames = base.frames, base.dtype, base.num_frames
        h, w = base.shape
        self.height, self.width = (w, h) if self.k % 2 else (h, w)

    @property
    def intensity_range(self):
        return self.base.intensity_range

    def read(self, index: int) -> np.ndarray:
        arr = np.rot90(self.base.read(index), self.k, axes=(0, 1))
        return np.flip(arr, 1) if self.flip else arr

    def model_input(self, index: int, size: int) -> torch.Tensor:
        return orient(self.base.model_input(index, size), self.k, self.flip).contiguous()


class EnsembleSession(SessionCommon):
    """A :class:`StackSession` run in ``orientations`` (1, 2, 4 or 8) orientations at once:
    every orientation advances one slice at a time, and an object stops early where the
    orientations' mean object score says absent.

    Takes StackSession's arguments (frames, intensity_range, fill_hole_area,
    non_overlap, corrections_as_conditioning, feature_cache_mb — shared by all
    orientations —, offload_state, fast) and offers its methods. Returned logits
    are the members' mean after clamping each to +-32 (not clamped with 1 orientation,
    which is exactly a StackSession).
    """

    def __init__(
        self,
        model: SAM2Model,
        frames: Union[FrameSource, "np.ndarray"],
        *,
        orientations: int = 8,
        intensity_range: Optional[Sequence[float]] = None,
        non_overlap: bool = False,
        feature_cache_mb: float = 256,
        **session_kwargs,
    ) -> None:
        orientations = check_orientations(orientations)
        self.model = model
        self.frames = FrameSource.for_model(model, frames, intensity_range)
        self.num_frames = len(self.frames)
        self.height, self.width = self.frames.shape
        self.non_overlap = non_overlap
        self.orientations = ORIENTATIONS[:orientations]
        self.members: List[StackSession] = [
            StackSession(
                model, OrientedFrames(self.frames, k, flip), non_overlap=False,
                feature_cache_mb=feature_cache_mb / orientations,
                compute_features=functools.partial(self._encode, i), **session_kwargs,
            )
            for i, (k, flip) in enumerate(self.orientations)
        ]

    # ------------------------------------------------------------------ state

    @property
    def objects(self):
        """The objects (every orientation holds the same prompts)."""
        return self.members[0].objects

    @property
    def obj_ids(self) -> List[int]:
        return self.members[0].obj_ids

    @property
    def state_nbytes(self) -> int:
        return sum(m.state_nbytes for m in self.members)

    def _encode(self, member: int, frame: int) -> FrameFeatures:
        """Features of one slice in every orientation, one batch through the image encoder:
        every other member's cache receives its own, ``member``'s are returned (members
        ask for a slice's features through this when they do not hold them)."""
        device = self.model.device
        view = self.frames.model_input(frame, self.model.image_size)  # read and resized once
        x = torch.cat([orient(view, k, flip) for k, flip in self.orientations]).to(device)  # O 3 S S
        with torch.inference_mode(), autocast_context(device, torch.bfloat16 if self.fast else None):
            f = self.model.frame_features(self.model.normalize(x))
        feats = [
            FrameFeatures(
                f.image_embed[i : i + 1].float().clone(), [h[i : i + 1].float().clone() for h in f.high_res],
                f.pos[i : i + 1].float().clone(),
            )
            for i in range(len(self.members))
        ]
        for i, m in enumerate(self.members):
            if i != member:
                m.features.put(frame, feats[i])
        return feats[member]

    def _mean(self, lows: Sequence[torch.Tensor]) -> torch.Tensor:
        """The members' low-resolution logits turned back to the caller's orientation and averaged."""
        if len(lows) == 1:
            return lows[0]
        mean = sum(unorient(low.clamp(-LOGIT_CLAMP, LOGIT_CLAMP), k, f) for low, (k, f) in zip(lows, self.orientations))
        return mean / len(lows)

    def _combine(self, lows: Sequence[torch.Tensor], return_logits: bool) -> Dict[int, np.ndarray]:
        return low_res_to_slice(self._mean(lows), self.obj_ids, (self.height, self.width), self.non_overlap, return_logits)

    # ------------------------------------------------------------------ prompts

    @torch.inference_mode()
    def add_points(
        self, frame: int, obj_id: int, points=None, labels=None, box=None, *, clear: bool = True, return_logits: bool = False
    ) -> Dict[int, np.ndarray]:
        """As :meth:`StackSession.add_points`."""
        frame = check_frame(frame, self.num_frames)
        size = self.model.image_size
        pts, lab = slice_prompt(points, labels, box, (self.height, self.width), size, clear=clear)  # caller's view
        lows = []
        for member, (k, flip) in zip(self.members, self.orientations):
            p = orient_xy(pts, size, k, flip)
            if tuple(lab[:2]) == BOX_LABELS:  # box corners: top-left and bottom-right again
                p[:2] = np.stack([p[:2].min(0), p[:2].max(0)])
            lows.append(member.add_model_points(frame, obj_id, p, lab, clear=clear))
        return self._combine(lows, return_logits)

    @torch.inference_mode()
    def add_mask(self, frame: int, obj_id: int, mask, *, return_logits: bool = False) -> Dict[int, np.ndarray]:
        """As :meth:`StackSession.add_mask`."""
        frame = check_frame(frame, self.num_frames)
        t = mask_to_model(check_mask(mask, (self.height, self.width)), self.model.image_size, self.model.device)
        lows = [
            member.add_model_mask(frame, obj_id, orient(t, k, flip).contiguous())
            for member, (k, flip) in zip(self.members, self.orientations)
        ]
        return self._combine(lows, return_logits)

    def clear_frame(self, frame: int, obj_id: int) -> None:
        for m in self.members:
            m.clear_frame(frame, obj_id)

    def remove_object(self, obj_id: int) -> None:
        for m in self.members:
            m.remove_object(obj_id)

    def reset(self) -> None:
        for m in self.members:
            m.reset()

    def snapshot(self, obj_id: int):
        """As :meth:`StackSession.snapshot` (one per orientation)."""
        return [m.snapshot(obj_id) for m in self.members]

    def restore(self, obj_id: int, snapshot) -> None:
        """As :meth:`StackSession.restore`."""
        for m, snap in zip(self.members, snapshot or [None] * len(self.members)):
            m.restore(obj_id, snap)

    def clear_features(self) -> None:
        for m in self.members:
            m.clear_features()

    @property
    def fast(self) -> bool:
        return self.members[0].fast

    @fast.setter
    def fast(self, value: bool) -> None:
        for m in self.members:
            m.fast = bool(value)

    def prefetch(self, frames: Sequence[int]) -> None:
        for m in self.members:
            m.prefetch(frames)

    # ------------------------------------------------------------------ propagation

    def propagate_logits(self, direction: str = "both", *, stop_after_absent: Optional[int] = None, **plan_kwargs):
        """As :meth:`StackSession.propagate_logits`, with the orientations' mean logits."""
        for m in self.members:
            m.commit()
        sweeps = self.members[0].plan(direction, **plan_kwargs)
        yield from run_sweeps(self.members[0], sweeps, self.step, stop_after_absent)

    def step(self, frame: int, obj_ids: Sequence[int], reverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`StackSession.step`: mean logits and mean object scores of the orientations."""
        lows, scores = [], []
        for m in self.members:
            low, score = m.step(frame, obj_ids, reverse)
            lows.append(low)
            scores.append(score)
        return self._mean(lows), torch.stack(scores).mean(0)

    def skipped_frames(self, obj_id: int) -> List[int]:
        """As :meth:`StackSession.skipped_frames` (recorded on the first orientation)."""
        return self.members[0].skipped_frames(obj_id)
