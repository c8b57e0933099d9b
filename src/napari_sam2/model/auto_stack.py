"""Segment everything in a stack or a time-lapse: automatic proposals become tracked objects.

The 2D generator (:mod:`.automatic`) proposes masks on a *key slice* (the middle one
unless told); each proposal becomes an object prompted with its mask there, and all of
them are tracked both ways in one batch until each is absent (early stop). Every
``every`` slices outwards from the key slice the generator looks again: proposals that
the objects already tracked do not cover (nuclei that begin deeper in z, cells that
enter the field or divide) become new objects, tracked both ways too. Overlaps are
resolved per slice: an object only takes pixels no earlier object holds, so ids stay
consistent through the stack.

Proposals are chosen for instance segmentation rather than for Meta's "everything"
(which keeps parts and wholes side by side): candidates are ranked by their stability
score plus ``size_weight`` x ln(area) (a point inside a nucleus also yields stable
masks of parts of it; among stable masks the whole, larger one should win) and taken
greedily when at most ``max_overlap`` of their area lies on a mask already taken;
masks smaller than ``min_area`` pixels or larger than ``max_area_fraction`` of the
slice (background) are dropped. The ranking is unchanged when all areas scale
together, so it does not depend on the image size. With ``refine`` (the default) each
chosen mask is then replaced by what one click at its most interior pixel gives (as a
user would click; a grid point often lies near an object's edge and yields a part of
it), and the refined masks are chosen again by the same rules, which merges fragments
of one object.

Everything here works on a :class:`~napari_sam2.model.session.Session`, so the
controller runs it on its own sessions and the objects it makes are ordinary objects.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .automatic import PARAM_NAMES, AutoMask, AutomaticMaskGenerator
from .postprocess import paint_masks, write_masks
from .preprocess import InputError

__all__ = [
    "PROPOSAL_DEFAULTS",
    "AutoEvent",
    "StackAutoParams",
    "auto_segment_session",
    "interior_point",
    "is_single_image",
    "proposal_slices",
    "propose",
    "segment_slice",
    "segment_stack",
    "select_masks",
]

#: The 2D generator's settings for proposals: looser than Meta's defaults because the
#: ranking and the overlap rule below do the choosing (the bundled nano model's predicted
#: IoU says little; stability does). Chosen on training seeds of the generated data.
PROPOSAL_DEFAULTS = {"points_per_side": 32, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.6, "box_nms_thresh": 0.7}


@dataclass(frozen=True)
class StackAutoParams:
    """How proposals are chosen and how often the stack is searched for new objects.

    every: look for new objects every this many slices from the key slice (1: on every
    slice); covered: a proposal whose area is at least this fraction already labelled
    is an object already tracked; key_slice: where to start (None: the middle);
    stop_after_absent: an object stops in a direction after this many slices where the
    model says it is absent (None: never); min_area / max_area_fraction / max_overlap /
    size_weight / refine: see the module's doc.
    """

    every: int = 4
    covered: float = 0.5
    key_slice: Optional[int] = None
    stop_after_absent: Optional[int] = 2
    min_area: int = 16
    max_area_fraction: float = 0.5
    max_overlap: float = 0.3
    size_weight: float = 0.4
    refine: bool = True

    def __post_init__(self) -> None:
        for name in ("every", "covered", "min_area", "max_area_fraction", "max_overlap", "size_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise InputError(f"{name} must be a number, got {value!r}")
        if self.key_slice is not None and not isinstance(self.key_slice, (int, np.integer)):
            raise InputError(f"key_slice must be a slice index or None, got {self.key_slice!r}")
        if int(self.every) < 1:
            raise InputError(f"every must be at least 1 (look for new objects every N slices), got {self.every}")
        for name in ("covered", "max_area_fraction", "max_overlap"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{name} must be between 0 and 1, got {v}")
        if float(self.size_weight) < 0:
            raise InputError(f"size_weight must be >= 0, got {self.size_weight}")
        if int(self.min_area) < 0:
            raise InputError(f"min_area must be >= 0 pixels, got {self.min_area}")
        if self.stop_after_absent is not None and int(self.stop_after_absent) < 1:
            raise InputError(f"stop_after_absent must be at least 1 (or None: never stop), got {self.stop_after_absent}")


STACK_PARAM_NAMES = tuple(f.name for f in fields(StackAutoParams))


def split_params(params: dict) -> Tuple[dict, StackAutoParams]:
    """Keyword arguments -> (the 2D generator's, the stack's); unknown names are refused."""
    unknown = set(params) - set(PARAM_NAMES) - set(STACK_PARAM_NAMES)
    if unknown:
        raise InputError(f"unknown parameter(s) {sorted(unknown)}; known: {', '.join(PARAM_NAMES + STACK_PARAM_NAMES)}")
    gen = {**PROPOSAL_DEFAULTS, **{k: v for k, v in params.items() if k in PARAM_NAMES}}
    return gen, StackAutoParams(**{k: v for k, v in params.items() if k in STACK_PARAM_NAMES})


def select_masks(
    masks: Sequence[AutoMask], hw: Tuple[int, int], *, min_area: int = 16, max_area_fraction: float = 0.5,
    max_overlap: float = 0.3, size_weight: float = 0.4,
) -> List[np.ndarray]:
    """Non-overlapping masks for instance segmentation, best first (see the module's doc).

    Each chosen mask loses the pixels an earlier one took; returns H x W booleans."""
    h, w = hw
    taken = np.zeros(hw, bool)
    score = [float(np.nan_to_num(m.stability_score)) + size_weight * np.log(max(m.area, 1)) for m in masks]
    order = sorted(range(len(masks)), key=lambda i: (-score[i], -masks[i].predicted_iou, i))
    out = []
    for i in order:
        m = masks[i]
        area = m.area
        if area < max(min_area, 1) or area > max_area_fraction * h * w:
            continue
        x0, y0, x1, y1 = m.box
        window = taken[y0:y1 + 1, x0:x1 + 1]  # a view: only the mask's box is looked at
        part = m.crop & ~window
        free = np.count_nonzero(part)
        if area - free > max_overlap * area or free < max(min_area, 1):
            continue
        window |= part
        full = np.zeros(hw, bool)
        full[y0:y1 + 1, x0:x1 + 1] = part
        out.append(full)
    return out


def proposal_slices(num_frames: int, key: int, every: int) -> List[int]:
    """The key slice, then every ``every``-th slice outwards, alternating sides, nearest first;
    the first and last slices are always searched (objects cut by the stack's ends)."""
    below = list(range(key - every, 0, -every)) + ([0] if key > 0 else [])
    above = list(range(key + every, num_frames - 1, every)) + ([num_frames - 1] if key < num_frames - 1 else [])
    out = [key]
    for k in range(max(len(below), len(above))):
        out += above[k:k + 1] + below[k:k + 1]
    return out


def interior_point(mask: np.ndarray) -> Tuple[float, float]:
    """(x, y) of the pixel of ``mask`` farthest from its edge (the image border counts as edge)."""
    from scipy import ndimage as ndi

    d = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(x), float(y)


def propose(generator: AutomaticMaskGenerator, image, intensity_range, params: StackAutoParams,
            should_stop: Optional[Callable[[], bool]] = None) -> List[np.ndarray]:
    """Non-overlapping object masks on one 2D image (see the module's doc), best first.
    should_stop() is asked between batches of prompts (True: what was found so far)."""
    arr = np.asarray(image)
    intensity_range = generator.intensity_mapping(arr, intensity_range)  # once for both passes
    hw = arr.shape[:2]
    rules = {"min_area": params.min_area, "max_area_fraction": params.max_area_fraction,
             "max_overlap": params.max_overlap, "size_weight": params.size_weight}
    chosen = select_masks(generator.generate(arr, intensity_range, should_stop=should_stop), hw, **rules)
    if not params.refine or not chosen or (should_stop is not None and should_stop()):
        return chosen
    refined = generator.masks_at_points(arr, [interior_point(m) for m in chosen], intensity_range)
    return select_masks(refined, hw, **rules)


@dataclass
class AutoEvent:
    """What :func:`auto_segment_session` did: ``kind`` "found" (new objects on ``frame``)
    or "tracked" (masks of objects on ``frame`` from tracking); ``masks``: {obj_id: H x W
    bool}, the model's masks; ``prompts``: the mask prompts new objects were given;
    ``searched``: proposal slices searched so far, of ``total``."""

    kind: str
    frame: int
    masks: Dict[int, np.ndarray]
    searched: int
    total: int
    prompts: Dict[int, np.ndarray] = field(default_factory=dict)


def auto_segment_session(
    session, generator: AutomaticMaskGenerator, *, params: StackAutoParams = StackAutoParams(),
    next_id: Callable[[], int], occupied: Optional[Callable[[int], np.ndarray]] = None, track: bool = True,
    existing: Sequence[int] = (), lock=None, should_stop: Optional[Callable[[], bool]] = None,
) -> Iterator[AutoEvent]:
    """Find and track every object of a session's stack (see the module's doc).

    next_id() gives the label of each new object (the caller's numbering); occupied(frame)
    gives pixels of a slice that are taken besides what this run found (e.g. the caller's
    labels). track=False: proposals on the key slice only, nothing tracked. existing: objects
    the session already holds (e.g. a user's objects not yet propagated), tracked first so
    that no proposal duplicates them. lock: a context manager held around each use of the
    session (not while proposals are searched). should_stop(): asked while proposals are
    searched and between slices (True: the run ends). Yields an :class:`AutoEvent` per
    slice; stop iterating at any time: what was yielded stays valid.
    """
    guard = lock if lock is not None else contextlib.nullcontext()
    stop = should_stop or (lambda: False)
    n, hw = session.num_frames, (session.height, session.width)
    key = n // 2 if params.key_slice is None else int(params.key_slice)
    if not 0 <= key < n:
        raise InputError(f"key_slice {key} is outside the stack (0..{n - 1})")
    own = np.zeros((n, *hw), np.int32)  # what this run wrote (slices in the session's order)
    todo = proposal_slices(n, key, int(params.every)) if track else [key]
    ranges = session.frames.intensity_range
    region = getattr(session, "roi", None)  # a session on a region of interest: proposals there only

    def proposals_on(frame: int) -> List[np.ndarray]:
        image = session.frames.read(frame, region=None if region is None else region.slices)
        found = propose(generator, image, ranges, params, should_stop=stop)
        return found if region is None else [region.paste(m, hw, False) for m in found]

    def tracked(ids, skip_frame=None, new=()):
        run = session.propagate("both", obj_ids=ids, stop_after_absent=params.stop_after_absent)
        while True:
            with guard:
                item = next(run, None)
            if item is None:
                return
            f, masks = item
            masks = {i: m for i, m in masks.items() if not (i in new and f == skip_frame)}
            if masks:
                paint_masks(own[f], masks)
                yield f, masks
            if stop():
                return

    with guard:
        waiting = [int(i) for i in existing if int(i) in session.objects] if track else []
    if waiting:
        for f, masks in tracked(waiting):
            yield AutoEvent("tracked", f, masks, 0, len(todo))
    for done, frame in enumerate(todo, 1):
        if stop():
            return
        proposals = proposals_on(frame)
        if stop():
            return
        taken = own[frame] > 0
        if occupied is not None:
            taken |= np.asarray(occupied(frame), bool)
        new: Dict[int, np.ndarray] = {}
        given: Dict[int, np.ndarray] = {}
        for m in proposals:
            area = np.count_nonzero(m)
            if np.count_nonzero(m & taken) >= params.covered * area:
                continue
            part = m & ~taken
            if np.count_nonzero(part) < max(params.min_area, 1):
                continue
            obj_id = int(next_id())
            given[obj_id] = part
            with guard:
                new[obj_id] = session.add_mask(frame, obj_id, part)[obj_id]  # the model's mask from that prompt
            taken |= part | new[obj_id]
        if new:
            paint_masks(own[frame], new)
        yield AutoEvent("found", frame, new, done, len(todo), given)
        if not track or not new:
            continue
        for f, masks in tracked(list(new), skip_frame=frame, new=new):
            yield AutoEvent("tracked", f, masks, done, len(todo))


# ---------------------------------------------------------------------- one call each


def is_single_image(shape: Sequence[int]) -> bool:
    """Whether an array of this shape is one 2D image (H x W, or H x W x RGB(A)), not a stack."""
    return len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4))


def segment_slice(model, image, intensity_range: Optional[Sequence[float]] = None, *, fast: bool = False,
                  tile: Union[None, int, str] = None, overlap: Optional[int] = None,
                  progress: Optional[Callable[[int, int], None]] = None, **params) -> np.ndarray:
    """Every object of one 2D image as a label image (uint32, 1, 2, ... best first).

    params: the 2D generator's (:class:`~.automatic.AutoMaskParams`) and the choosing
    rules of :class:`StackAutoParams` (min_area, max_area_fraction, max_overlap,
    size_weight, refine). tile: cut the image into overlapping tiles of this many pixels
    (:mod:`~napari_sam2.model.tiles`), "auto" (tiles of the model's input size when the
    image is more than 1.5 times larger), or None (the whole image at once); overlap:
    pixels shared by neighbouring tiles (default a quarter of a tile, at least 32).
    progress(tiles done, tiles) with tiles.
    """
    gen_params, stack = split_params(params)
    generator = AutomaticMaskGenerator(model, fast=fast, **gen_params)
    hw = np.asarray(image).shape[:2]
    out = np.zeros(hw, np.uint32)
    size = choose_tile(tile, hw, model.image_size)
    if size is None:
        for i, m in enumerate(propose(generator, image, intensity_range, stack), 1):
            out[m] = i
        return out
    from .tiles import default_overlap, propose_tiled

    ov = default_overlap(size) if overlap is None else int(overlap)
    pieces = propose_tiled(generator, image, intensity_range, stack, tile=size, overlap=ov, progress=progress)
    for i, p in enumerate(pieces, 1):
        out[p.box.slices][p.mask] = i
    return out


def choose_tile(tile: Union[None, int, str], hw: Tuple[int, int], image_size: int) -> Optional[int]:
    """The tile size ``tile`` asks for on an image of ``hw`` (None: no tiles)."""
    if tile is None:
        return None
    if isinstance(tile, str):
        if tile.strip().lower() != "auto":
            raise InputError(f"tile must be a number of pixels, 'auto' or None, got {tile!r}")
        return int(image_size) if max(hw) > 1.5 * image_size else None
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 16:
        raise InputError(f"tile must be a number of pixels (16 or more), 'auto' or None, got {tile!r}")
    return int(tile) if max(hw) > tile else None


def segment_stack(
    model, stack, intensity_range: Optional[Sequence[float]] = None, *, fast: bool = False, orientations: int = 1,
    nonfinite: str = "error", out: Optional[np.ndarray] = None,
    progress: Optional[Callable[[AutoEvent], None]] = None, should_stop: Optional[Callable[[], bool]] = None,
    **params,
) -> np.ndarray:
    """Every object of a stack or time-lapse (N x H x W, or N x H x W x C) as one label
    volume with ids consistent through it (uint32).

    params: :class:`StackAutoParams` fields and the 2D generator's. out: an N x H x W
    integer array to write into (its nonzero pixels count as taken and stay), so that
    what was computed survives a cancel or an error; progress(event) after each slice;
    should_stop() is asked after each slice (True: return what is done).
    """
    from .ensemble import open_session
    from .frames import FrameSource

    shape = tuple(getattr(stack, "shape", np.shape(stack)))
    if is_single_image(shape):
        raise InputError(f"a stack (N, H, W) is needed for the stack mode, got a 2D image of shape {shape}; "
                         "use segment_slice for one image")
    gen_params, stack_params = split_params(params)
    frames = FrameSource.for_model(model, stack, intensity_range, nonfinite=nonfinite)
    if out is None:
        out = np.zeros((frames.num_frames, *frames.shape), np.uint32)
    elif tuple(out.shape) != (frames.num_frames, *frames.shape):
        raise InputError(f"out must have the stack's shape {(frames.num_frames, *frames.shape)}, got {tuple(out.shape)}")
    elif not np.issubdtype(np.dtype(out.dtype), np.integer):
        raise InputError(f"out must hold integer labels (e.g. uint32), got dtype {out.dtype}")
    session = open_session(model, frames, orientations=orientations, fast=fast)
    generator = AutomaticMaskGenerator(model, fast=fast, **gen_params)
    top = np.iinfo(np.dtype(out.dtype)).max
    counter = iter(range(int(np.max(out)) + 1 if out.size else 1, 2**31))

    def next_id() -> int:
        i = next(counter)
        if i > top:
            raise InputError(f"out is {np.dtype(out.dtype)}, which cannot hold label {i}; give a uint32 array")
        return i

    run = auto_segment_session(session, generator, params=stack_params, next_id=next_id,
                               occupied=lambda f: np.asarray(out[f]) != 0, should_stop=should_stop)
    for event in run:
        write_masks(out, event.frame, event.masks)  # read, paint, write back: zarr / dask slices too
        if progress is not None:
            progress(event)
        if should_stop is not None and should_stop():
            break
    return out
