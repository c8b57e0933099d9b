"""Segment everything on large slices tile by tile (issue 18): tiles cover the slice, objects
cut by tile borders are merged, and blobs on the borders come out whole, once each.
Expectations are hand-made: tile positions worked out by hand, hand-drawn pieces, the
generated truth."""

from __future__ import annotations

import numpy as np
import pytest
from test_auto_stack import one_to_one, paint_blobs

from napari_sam2.model import InputError
from napari_sam2.model.auto_stack import segment_slice
from napari_sam2.model.roi import Roi
from napari_sam2.model.tiles import Piece, merge_pieces, tile_regions


def test_tiles_cover_the_slice_with_the_overlap_asked():
    tiles = tile_regions((352, 200), 128, 16)
    # rows: 3 tiles at 0, 112, 224 (exactly 16 shared); columns: 2 at 0 and 72 (56 shared)
    assert [(t.top, t.bottom) for t in tiles[::2]] == [(0, 128), (112, 240), (224, 352)]
    assert [(t.left, t.right) for t in tiles[:2]] == [(0, 128), (72, 200)]
    covered = np.zeros((352, 200), int)
    for t in tiles:
        covered[t.slices] += 1
    assert covered.min() >= 1
    assert tile_regions((100, 90), 128, 32) == [Roi(0, 0, 100, 90)]  # smaller than a tile: itself
    for bad in ((8, 0), (128, 128), (128, -1)):
        with pytest.raises(InputError):
            tile_regions((300, 300), *bad)


def test_pieces_of_an_object_cut_by_tiles_are_merged_into_it():
    tiles = [Roi(0, 0, 64, 64), Roi(0, 48, 64, 112)]  # a 16-pixel shared strip, columns 48..63
    yy, xx = np.mgrid[0:64, 0:112]
    disc = (yy - 30) ** 2 + (xx - 56) ** 2 < 20 ** 2  # centred in the strip, wider than it
    left = Piece(Roi(0, 0, 64, 64), disc[:, :64].copy(), 0, True)
    right = Piece(Roi(0, 48, 64, 112), disc[:, 48:].copy(), 1, True)
    other = np.zeros((64, 64), bool)
    other[5:9, 5:9] = True  # a small whole object of tile 0
    small = Piece(Roi(0, 0, 64, 64), other, 0, False)
    merged = merge_pieces([left, small, right], tiles)
    assert len(merged) == 2
    big = max(merged, key=lambda p: p.area)
    full = np.zeros((64, 112), bool)
    full[big.box.slices] = big.mask
    np.testing.assert_array_equal(full, disc)
    # pieces that do not share the strip's pixels stay apart
    far = Piece(Roi(0, 48, 64, 112), np.zeros((64, 64), bool), 1, True)
    far.mask[50:60, 40:60] = True
    assert len(merge_pieces([left, far], tiles)) == 2


def test_blobs_on_tile_borders_are_found_whole_once(nano):
    rng = np.random.default_rng(7)
    # tiles of 128 with 16 shared: borders around columns and rows 112..128 and 224..240
    centres = [(120, 120), (60, 232), (232, 60), (300, 300), (40, 40), (180, 180), (120, 300), (300, 120)]
    radii = [14, 12, 13, 9, 10, 11, 12, 10]
    image, truth = paint_blobs((352, 352), centres, radii, rng, 400, 4000, np.uint16)
    labels = segment_slice(nano, image, tile=128, overlap=16)
    matched = one_to_one(labels, truth)
    assert len(matched) == len(centres), matched
    assert min(iou for _lab, iou in matched.values()) >= 0.7, matched
    assert labels.max() == len(centres)  # nothing split in two, nothing extra
    whole = segment_slice(nano, image, tile=None)  # the whole slice at 128 px: 2.75 times smaller
    assert sum(iou >= 0.7 for _l, iou in one_to_one(whole, truth).values()) < len(centres)


def test_tile_choice_is_checked(nano):
    image = np.zeros((64, 64), np.uint8)
    for bad, says in ((8, "16 or more"), ("big", "'auto' or None"), (True, "16 or more")):
        with pytest.raises(InputError, match=says):
            segment_slice(nano, image, tile=bad)


def test_cli_auto_tiles_a_large_2d_image(nano, tmp_path, capsys):
    import tifffile

    from napari_sam2.cli import main

    rng = np.random.default_rng(3)
    centres = [(60, 60), (120, 120), (200, 90), (250, 250), (90, 230)]
    image, truth = paint_blobs((300, 300), centres, [10, 13, 9, 12, 11], rng, 400, 4000, np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", image)
    assert main(["auto", str(tmp_path / "big.tif"), "-o", str(tmp_path / "out.tif")]) == 0  # tiles by default
    written = tifffile.imread(tmp_path / "out.tif")
    matched = one_to_one(written, truth)
    assert len(matched) == len(centres) and min(iou for _l, iou in matched.values()) >= 0.7, matched
    assert "tiles" in capsys.readouterr().err  # the progress bar counts tiles
    assert main(["auto", str(tmp_path / "big.tif"), "-o", str(tmp_path / "x.tif"), "--tile", "8"]) == 1
    assert "16 or more" in capsys.readouterr().err
    assert main(["auto", str(tmp_path / "big.tif"), "-o", str(tmp_path / "x.tif"), "--tile", "wide"]) == 1
    assert "'auto' or 'none'" in capsys.readouterr().err


def test_segment_all_on_a_large_slice_works_on_tiles_and_tracks_each_object_on_its_tile(nano):
    from napari_sam2.controller import Annotator

    rng = np.random.default_rng(11)
    centres = [(60, 60), (120, 200), (210, 90), (250, 250), (118, 118)]
    frames = [paint_blobs((300, 300), [(y + 2 * t, x + t) for y, x in centres], [10, 12, 9, 11, 13], rng,
                          400, 4000, np.uint16) for t in range(3)]
    stack, truth = np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames])
    ann = Annotator(nano, stack, axis=0, displayed=(1, 2), intensity_range=(400, 4400), orientations=1)
    assert ann.segment_everything((1, 0, 0))
    found = ann.labels[1]
    matched = one_to_one(found, truth[1])
    assert len(matched) == len(centres) and min(iou for _l, iou in matched.values()) >= 0.7, matched
    assert len(ann.objects) == len(centres)
    for obj in ann.objects.values():  # each on a 128 px tile that holds its mask
        assert obj.roi is not None and obj.roi.shape == (128, 128)
        rows, cols = np.nonzero(found == obj.obj_id)
        assert obj.roi.top <= rows.min() and rows.max() < obj.roi.bottom
        assert obj.roi.left <= cols.min() and cols.max() < obj.roi.right
    ann.propagate((1, 0, 0))  # tracked on their tiles, through the other slices
    for t in (0, 2):
        matched = one_to_one(ann.labels[t], truth[t])
        assert len(matched) == len(centres) and min(iou for _l, iou in matched.values()) >= 0.6, (t, matched)
    assert ann.undo() == "propagation"
    assert ann.undo() == "auto"
    assert not ann.labels.any() and not ann.objects
