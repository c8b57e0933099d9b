"""Follow objects through z *and* over time in a T-Z-Y-X movie, prompted once.

The first time point is segmented from the user's prompts (clicks, a seed label
volume, or segment everything). Every later time point's z-stack is then seeded
from the previous time point's result: each object is prompted on the slice where
it was largest, with one click at its most interior pixel (the model finds it where
it is now), and tracked both ways through z. Objects keep
their ids over time; one that is no longer found stops being followed.

Example::

    labels = segment_movie(model, movie, seeds=first_volume_labels)   # T x Z x Y x X
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .frames import FrameSource
from .postprocess import write_masks
from .preprocess import InputError

__all__ = ["MovieEvent", "segment_movie"]


@dataclass
class MovieEvent:
    """Progress of :func:`segment_movie`: time point ``time`` of ``total`` is done, with
    ``objects`` followed there (ids) and ``lost`` (ids not found any more)."""

    time: int
    total: int
    objects: List[int]
    lost: List[int]


def _check_movie(movie) -> Tuple[int, ...]:
    shape = tuple(getattr(movie, "shape", np.shape(movie)))
    if len(shape) != 4:
        raise InputError(f"a movie is T x Z x Y x X (4 axes), got shape {shape}; a z-stack or a time-lapse of 2D "
                         "frames is one stack: segment it with a stack session")
    if min(shape) == 0:
        raise InputError(f"the movie is empty (shape {shape})")
    return shape


def seed_from(session, previous: np.ndarray, how: str) -> None:
    """Prompt every object of the previous time point's label volume on the slice where it
    was largest: with its mask ("mask"), or with one click at its most interior pixel
    ("click": the model then finds the object where it is now, which follows motion; a mask
    prompt is taken as the answer on its slice, so a moved object starts off shifted)."""
    from .auto_stack import interior_point
    from .video import largest_slices

    if how == "mask":
        session.add_label_volume(previous)
        return
    for obj, z in largest_slices(previous, previous.shape).items():
        session.add_points(z, obj, points=[interior_point(previous[z] == obj)], labels=[1])


def segment_movie(
    model, movie, *, seeds=None, points: Optional[Dict[Tuple[int, int], Tuple[Sequence, Sequence]]] = None,
    auto: Optional[dict] = None, intensity_range: Optional[Sequence[float]] = None, orientations: int = 1,
    fast: bool = False, stop_after_absent: Optional[int] = 2, nonfinite: str = "error",
    out: Optional[np.ndarray] = None, progress: Optional[Callable[[MovieEvent], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None, seed_with: str = "click",
) -> np.ndarray:
    """Every prompted object of a T x Z x Y x X movie, through z and over time (uint32 labels).

    Prompts, on the first time point, one of: ``seeds`` (a Z x Y x X label volume, each
    nonzero label an object), ``points`` ({(slice, object): (N x 2 (x, y) clicks, N labels
    1 / 0)}), or ``auto`` (segment everything on it: :func:`~.auto_stack.segment_stack`'s
    parameters, {} for its defaults). intensity_range: one mapping for the whole movie
    (default: the first time point's percentiles). stop_after_absent: stop an object in
    z after that many slices where it is absent. out: a T x Z x Y x X integer array to
    write into (time points are written as they finish, so a cancel or error keeps them).
    progress(event) after each time point; should_stop() between time points. seed_with:
    how each later time point is prompted from the previous one's result, per object on the
    slice where it was largest: "click" (one click at its most interior pixel, the default)
    or "mask" (its mask; see :func:`seed_from`).
    """
    from .ensemble import open_session

    shape = _check_movie(movie)
    if seed_with not in ("click", "mask"):
        raise InputError(f"seed_with must be 'click' or 'mask', got {seed_with!r}")
    given = [name for name, v in (("seeds", seeds), ("points", points), ("auto", auto)) if v is not None]
    if len(given) != 1:
        raise InputError("give the first time point's prompts as exactly one of seeds, points or auto"
                         + (f" (got {', '.join(given)})" if given else ""))
    rng = FrameSource.for_model(model, movie[0], intensity_range, nonfinite=nonfinite).intensity_range
    if out is None:
        out = np.zeros(shape, np.uint32)
    elif tuple(out.shape) != shape or not np.issubdtype(np.dtype(out.dtype), np.integer):
        raise InputError(f"out must be an integer array of the movie's shape {shape}, got {out.dtype} {tuple(out.shape)}")
    stop = should_stop or (lambda: False)

    def session_at(t: int):
        return open_session(model, FrameSource(movie[t], rng, nonfinite=nonfinite), orientations=orientations, fast=fast)

    def track(session, t: int) -> np.ndarray:
        labels = np.zeros(shape[1:], out.dtype)
        for z, masks in session.propagate("both", stop_after_absent=stop_after_absent):
            write_masks(labels, (z,), masks)
        out[t] = labels
        return labels  # kept here: out may be on disk

    if auto is not None:
        from .auto_stack import segment_stack

        first = np.zeros(shape[1:], np.uint32)
        segment_stack(model, movie[0], rng, fast=fast, orientations=orientations, nonfinite=nonfinite, out=first,
                      should_stop=should_stop, **{"stop_after_absent": stop_after_absent, **auto})
        out[0] = previous = first
    else:
        session = session_at(0)
        if seeds is not None:
            vol = np.asarray(seeds)
            if vol.shape == shape[2:]:
                raise InputError(f"seeds must be a label volume of one time point {shape[1:]}; a 2D label image "
                                 "seeds one slice: put it in a volume of zeros at its slice")
            session.add_label_volume(vol)
        else:
            for (z, obj), (xy, labs) in sorted(points.items()):
                session.add_points(int(z), int(obj), points=xy, labels=labs, clear=False)
        previous = track(session, 0)
    followed = sorted(int(i) for i in np.unique(previous) if i > 0)
    if progress is not None:
        progress(MovieEvent(0, shape[0], followed, []))
    for t in range(1, shape[0]):
        if stop() or not followed:
            break
        session = session_at(t)
        seed_from(session, previous, seed_with)
        previous = track(session, t)
        now = sorted(int(i) for i in np.unique(previous) if i > 0)
        lost = sorted(set(followed) - set(now))
        followed = now
        if progress is not None:
            progress(MovieEvent(t, shape[0], followed, lost))
    return out
