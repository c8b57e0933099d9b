"""The interface every kind of stack session offers, declared once.

A :class:`~napari_sam2.model.video.StackSession` (plain SAM 2 tracking) and an
:class:`~napari_sam2.model.ensemble.EnsembleSession` (several orientations of it,
averaged) both satisfy :class:`Session`; the segmenter and the evaluation use a
session only through it.
"""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    runtime_checkable,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .frames import FrameSource
    from .video import ObjectState

__all__ = ["Session"]


@runtime_checkable
class Session(Protocol):
    """Interactive tracking of objects through the slices of one stack.

    Slices are numbered 0 .. num_frames - 1; coordinates are (x, y) pixels of a
    slice (height x width); masks are height x width. ``isinstance(s, Session)``
    checks that every member is present.
    """

    frames: FrameSource  # the slices, read lazily (its intensity mapping can change)
    num_frames: int
    height: int
    width: int
    fast: bool  # bfloat16 autocast for what is computed from now on

    @property
    def objects(self) -> Mapping[int, ObjectState]:
        """{obj_id: what the session holds for that object} (``prompted_frames`` among it)."""

    @property
    def obj_ids(self) -> List[int]: ...

    @property
    def state_nbytes(self) -> int:
        """Bytes held in per-object memories."""

    # prompts
    def add_points(
        self, frame: int, obj_id: int, points=None, labels=None, box=None, *, clear: bool = True, return_logits: bool = False
    ) -> Dict[int, np.ndarray]:
        """Clicks (N x 2 (x, y), labels 1 / 0) and / or a box (x0, y0, x1, y1) for one
        object on one slice; returns {obj_id: H x W mask} of every object on that slice."""

    def add_mask(self, frame: int, obj_id: int, mask, *, return_logits: bool = False) -> Dict[int, np.ndarray]:
        """An object's H x W mask on one slice as its prompt; returns the slice's masks."""

    def add_labels(self, frame: int, label_slice, *, return_logits: bool = False) -> Dict[int, np.ndarray]:
        """Every nonzero label of an H x W slice becomes the mask prompt of that object."""

    def add_label_volume(self, labels) -> Dict[int, int]:
        """Each object of an N x H x W label volume is prompted where it is largest."""

    # editing and undo
    def clear_frame(self, frame: int, obj_id: int) -> None: ...

    def remove_object(self, obj_id: int) -> None: ...

    def reset(self) -> None: ...

    def snapshot(self, obj_id: int) -> Any:
        """An opaque copy of one object's state, for :meth:`restore`."""

    def restore(self, obj_id: int, snapshot: Any) -> None: ...

    # slice features
    def clear_features(self) -> None: ...

    def prefetch(self, frames: Sequence[int]) -> None: ...

    # propagation
    def propagate(
        self, direction: str = "both", *, stop_after_absent: Optional[int] = None, return_logits: bool = False, **plan_kwargs
    ) -> Iterator[Tuple[int, Dict[int, np.ndarray]]]:
        """Yields (slice, {obj_id: mask}) as objects are tracked from their prompted slices."""

    def propagate_logits(
        self, direction: str = "both", *, stop_after_absent: Optional[int] = None, **plan_kwargs
    ) -> Iterator[Tuple[int, List[int], torch.Tensor, torch.Tensor]]:
        """As :meth:`propagate`: (slice, obj_ids, B 1 4h 4w logits, B object scores)."""

    def step(self, frame: int, obj_ids: Sequence[int], reverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Track ``obj_ids`` on one slice: (B 1 4h 4w logits, B object scores), on the CPU."""

    def skipped_frames(self, obj_id: int) -> List[int]:
        """Slices the last propagation of ``obj_id`` left out (stopped early)."""
