"""Segment everything on large slices, tile by tile, at the model's full detail.

The automatic generator sees a slice resized to the model's input size: on a
2048 x 2048 frame of 15-pixel nuclei each nucleus is a few pixels there. Here the
slice is cut into overlapping tiles (by default the model's input size, so a tile
is seen at its own resolution), proposals are made on each tile
(:func:`~napari_sam2.model.auto_stack.propose`), and put together:

- each connected part of a tile's mask is a piece; a piece that touches an inner tile border is *cut*; cut pieces of neighbouring tiles
  that cover the same pixels of the two tiles' shared strip are merged into one
  object (an object larger than the overlap, cut by every tile, comes back whole);
- an object lying in an overlap is found by two tiles: the larger of the copies is
  kept and a candidate mostly on pixels already taken is dropped, as on one slice.

All tiles share one intensity mapping (the whole slice's), so a dim tile is not
stretched into noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

from .preprocess import InputError
from .roi import Roi

__all__ = ["Piece", "assemble", "default_overlap", "home_tile", "merge_pieces", "pieces_on_tile", "propose_tiled", "tile_pieces", "tile_regions"]


def default_overlap(tile: int) -> int:
    """Pixels neighbouring tiles share unless told: a quarter of a tile, at least 32 (objects
    smaller than that lie whole in one tile; larger ones are merged across the strip)."""
    return min(max(32, int(tile) // 4), int(tile) - 1)


def tile_regions(shape: Tuple[int, int], tile: int, overlap: int) -> List[Roi]:
    """Regions of ``tile`` x ``tile`` pixels covering a slice of ``shape`` (H, W), neighbours
    sharing at least ``overlap`` pixels; the last row and column of tiles end at the slice's edge."""
    tile, overlap = int(tile), int(overlap)
    if tile < 16:
        raise InputError(f"tiles must be at least 16 pixels, got {tile}")
    if not 0 <= overlap < tile:
        raise InputError(f"the tiles' overlap must be 0 or more and less than the tile ({tile}), got {overlap}")

    def starts(n: int) -> List[int]:
        if n <= tile:
            return [0]
        count = int(np.ceil((n - overlap) / (tile - overlap)))
        return sorted({int(round(k * (n - tile) / (count - 1))) for k in range(count)})

    h, w = (int(v) for v in shape[:2])
    return [Roi(y, x, min(y + tile, h), min(x + tile, w)) for y in starts(h) for x in starts(w)]


@dataclass
class Piece:
    """A mask found on one tile: ``box`` (its bounding region on the slice), ``mask`` (that
    region's pixels), the tile it came from, and whether it touches an inner tile border."""

    box: Roi
    mask: np.ndarray
    tile: int
    cut: bool

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))


def _piece(mask: np.ndarray, tile: Roi, index: int, shape: Tuple[int, int]) -> Piece:
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    th, tw = tile.shape
    cut = ((y0 == 0 and tile.top > 0) or (x0 == 0 and tile.left > 0)
           or (y1 == th and tile.bottom < shape[0]) or (x1 == tw and tile.right < shape[1]))
    box = Roi(tile.top + y0, tile.left + x0, tile.top + y1, tile.left + x1)
    return Piece(box, np.ascontiguousarray(mask[y0:y1, x0:x1]), index, bool(cut))


def _within(p: Piece, r: Roi) -> np.ndarray:
    """p's pixels inside region r, as an r-shaped boolean array."""
    out = np.zeros(r.shape, bool)
    t, b = max(p.box.top, r.top), min(p.box.bottom, r.bottom)
    lft, rgt = max(p.box.left, r.left), min(p.box.right, r.right)
    if t < b and lft < rgt:
        out[t - r.top:b - r.top, lft - r.left:rgt - r.left] = p.mask[t - p.box.top:b - p.box.top,
                                                                      lft - p.box.left:rgt - p.box.left]
    return out


def _union(pieces: Sequence[Piece]) -> Piece:
    top = min(p.box.top for p in pieces)
    left = min(p.box.left for p in pieces)
    box = Roi(top, left, max(p.box.bottom for p in pieces), max(p.box.right for p in pieces))
    mask = np.zeros(box.shape, bool)
    for p in pieces:
        mask |= _within(p, box)
    return Piece(box, mask, pieces[0].tile, any(p.cut for p in pieces))


def merge_pieces(pieces: Sequence[Piece], tiles: Sequence[Roi], *, min_shared: float = 0.5) -> List[Piece]:
    """Cut pieces of different tiles that cover the same pixels of the two tiles' shared
    strip (intersection at least ``min_shared`` of the smaller one there) become one piece;
    pieces not cut are returned as they are."""
    cut = [i for i, p in enumerate(pieces) if p.cut]
    parent = list(range(len(pieces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a_pos, a in enumerate(cut):
        pa = pieces[a]
        for b in cut[a_pos + 1:]:
            pb = pieces[b]
            if pa.tile == pb.tile:
                continue
            ta, tb = tiles[pa.tile], tiles[pb.tile]
            shared = (max(ta.top, tb.top), max(ta.left, tb.left), min(ta.bottom, tb.bottom), min(ta.right, tb.right))
            if shared[0] >= shared[2] or shared[1] >= shared[3]:
                continue
            box = (max(pa.box.top, pb.box.top, shared[0]), max(pa.box.left, pb.box.left, shared[1]),
                   min(pa.box.bottom, pb.box.bottom, shared[2]), min(pa.box.right, pb.box.right, shared[3]))
            if box[0] >= box[2] or box[1] >= box[3]:
                continue
            strip = Roi(*shared)
            ma, mb = _within(pa, strip), _within(pb, strip)
            small = min(np.count_nonzero(ma), np.count_nonzero(mb))
            if small and np.count_nonzero(ma & mb) >= min_shared * small:
                parent[find(a)] = find(b)
    groups: dict = {}
    for i in range(len(pieces)):
        groups.setdefault(find(i), []).append(pieces[i])
    return [g[0] if len(g) == 1 else _union(g) for g in groups.values()]


def pieces_on_tile(generator, image: np.ndarray, intensity_range, params, tile: Roi, index: int,
                   should_stop: Optional[Callable[[], bool]] = None) -> List[Piece]:
    """The proposals of one tile of ``image`` (the whole slice), each connected part a piece:
    a tile's mask that joins two objects cut by its borders would otherwise merge both with
    their pieces in the next tiles."""
    from .auto_stack import propose

    hw = image.shape[:2]
    out = []
    for m in propose(generator, tile.crop(image), intensity_range, params, should_stop=should_stop):
        parts, n = ndi.label(m, structure=np.ones((3, 3), bool))
        for j in range(1, n + 1):
            part = parts == j
            if np.count_nonzero(part) >= max(params.min_area, 1):
                out.append(_piece(part, tile, index, hw))
    return out


def assemble(pieces: Sequence[Piece], tiles: Sequence[Roi], hw: Tuple[int, int], params,
             taken: Optional[np.ndarray] = None) -> List[Piece]:
    """Pieces of all tiles -> non-overlapping objects, best first: cut pieces merged across
    tiles, whole copies first, then larger first; a candidate mostly on pixels already
    taken (``taken``: pixels labelled before, or those of better candidates) is dropped."""
    merged = merge_pieces(pieces, tiles)
    merged.sort(key=lambda p: (p.cut, -p.area))
    taken = np.zeros(hw, bool) if taken is None else np.array(taken, bool)
    out = []
    for p in merged:
        window = taken[p.box.slices]
        part = p.mask & ~window
        free = int(np.count_nonzero(part))
        if p.area - free > params.max_overlap * p.area or free < max(params.min_area, 1):
            continue
        window |= part
        out.append(Piece(p.box, part, p.tile, p.cut))
    return out


def home_tile(box: Roi, tiles: Sequence[Roi]) -> Optional[Roi]:
    """The tile that holds all of ``box`` with the box nearest its centre (None: no tile holds it)."""
    best, best_d = None, np.inf
    cy, cx = (box.top + box.bottom) / 2, (box.left + box.right) / 2
    for t in tiles:
        if t.top <= box.top and t.left <= box.left and box.bottom <= t.bottom and box.right <= t.right:
            d = abs((t.top + t.bottom) / 2 - cy) + abs((t.left + t.right) / 2 - cx)
            if d < best_d:
                best, best_d = t, d
    return best


def tile_pieces(generator, image: np.ndarray, intensity_range, params, tiles: Sequence[Roi],
                should_stop: Optional[Callable[[], bool]] = None):
    """Yields (tile number, its pieces) tile by tile (stops when should_stop() says so)."""
    rng = generator.intensity_mapping(image, intensity_range)  # one mapping for every tile of the slice
    for k, t in enumerate(tiles):
        if should_stop is not None and should_stop():
            return
        yield k, pieces_on_tile(generator, image, rng, params, t, k, should_stop)


def propose_tiled(generator, image, intensity_range, params, *, tile: int, overlap: int,
                  should_stop: Optional[Callable[[], bool]] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> List[Piece]:
    """Non-overlapping object masks of a large 2D image found tile by tile (see the module's
    doc), as pieces (bounding region + mask), best first. params:
    :class:`~napari_sam2.model.auto_stack.StackAutoParams`. progress(tiles done, tiles)
    after each tile; should_stop() between tiles."""
    arr = np.asarray(image)
    tiles = tile_regions(arr.shape[:2], tile, overlap)
    pieces: List[Piece] = []
    for k, found in tile_pieces(generator, arr, intensity_range, params, tiles, should_stop):
        pieces += found
        if progress is not None:
            progress(k + 1, len(tiles))
    return assemble(pieces, tiles, arr.shape[:2], params)
