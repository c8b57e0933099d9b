"""Segment everything in a slice and through a stack (issue 16): the engine, the CLI and the
controller, with the bundled nano model on generated blobs whose true labels are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_sam2.model import InputError

CASES = [  # (height, width), centres, radii, dtype, black, white
    ((128, 128), [(30, 30), (30, 95), (95, 30), (95, 95)], [12, 14, 11, 13], np.uint16, 400, 4000),
    ((160, 200), [(40, 50), (40, 150), (120, 60), (110, 150), (75, 100)], [14, 16, 12, 15, 10], np.uint8, 10, 250),
    ((256, 256), [(60, 60), (60, 190), (190, 70), (180, 190)], [24, 20, 28, 22], np.float32, 0.0, 1.0),
]


def paint_blobs(hw, centres, radii, rng, lo, hi, dtype):
    """Cell-like blobs (brighter in the middle, textured, blurred, noisy): (image, labels)."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    sig = np.zeros(hw)
    lab = np.zeros(hw, np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii), 1):
        d = ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2
        inside = d < 1
        sig[inside] = rng.uniform(0.6, 1.0) * (1 - 0.3 * d[inside])
        lab[inside] = k
    sig = ndi.gaussian_filter(sig, 1.0) * (1 + 0.2 * ndi.gaussian_filter(rng.normal(0, 1, hw), 2) / 0.14)
    img = lo + (hi - lo) * 0.8 * sig + rng.normal(0, (hi - lo) * 0.03, hw)
    return np.clip(img, lo, hi).astype(dtype), lab


def iou(a, b) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def one_to_one(pred, gt):
    """{true label: (predicted label covering most of it, IoU)}."""
    out = {}
    for k in np.unique(gt[gt > 0]):
        ids, counts = np.unique(pred[gt == k], return_counts=True)
        counts[ids == 0] = 0
        best = int(ids[np.argmax(counts)])
        out[int(k)] = (best, iou(pred == best, gt == k) if best else 0.0)
    return out


def appearing_blob_stack(n=16, hw=(128, 128), start=11, seed=0, dtype=np.uint16):
    """Blob 1 drifts through every slice; blob 2 exists only from slice ``start`` on."""
    images, labels = [], []
    for t in range(n):
        centres, radii = [(40, 36 + t)], [14]
        if t >= start:
            centres.append((92, 90))
            radii.append(13)
        img, lab = paint_blobs(hw, centres, radii, np.random.default_rng([seed, t]), 400, 4000, dtype)
        images.append(img)
        labels.append(lab)
    return np.stack(images), np.stack(labels)


# ---------------------------------------------------------------------- building blocks, by hand


def test_proposal_slices_by_hand():
    from napari_sam2.model.auto_stack import proposal_slices

    assert proposal_slices(16, 8, 4) == [8, 12, 4, 15, 0]
    assert proposal_slices(10, 0, 3) == [0, 3, 6, 9]
    assert proposal_slices(1, 0, 4) == [0]
    assert proposal_slices(5, 2, 1) == [2, 3, 1, 4, 0]


def test_select_masks_by_hand():
    """Larger stable masks win over their parts; overlapping ones are dropped; background-sized
    and tiny ones too; a later mask loses the pixels an earlier one took."""
    from napari_sam2.model.auto_stack import select_masks
    from napari_sam2.model.automatic import AutoMask

    hw = (40, 40)

    def mk(y0, x0, y1, x1, stab, piou=0.5):
        crop = np.ones((y1 - y0 + 1, x1 - x0 + 1), bool)
        return AutoMask((x0, y0, x1, y1), crop, piou, stab, (x0, y0), (0, 0, 40, 40))

    whole = mk(0, 0, 9, 9, 0.90)  # 100 px
    part = mk(0, 0, 4, 4, 0.95)  # 25 px inside the whole: a little more stable, much smaller
    neighbour = mk(8, 12, 17, 21, 0.80)  # 100 px, touches nothing
    overlapping = mk(5, 5, 14, 14, 0.99)  # 100 px, 25 px (25%) on the whole: kept, minus them
    background = mk(0, 0, 39, 39, 1.0)  # the whole slice
    speck = mk(30, 30, 31, 31, 1.0)  # 4 px
    chosen = select_masks([part, whole, neighbour, overlapping, background, speck], hw, min_area=16,
                          max_area_fraction=0.5, max_overlap=0.3, size_weight=0.4)
    expected = []
    taken = np.zeros(hw, bool)
    # by hand: scores 0.99+0.4 ln100 (overlapping) > 0.90+0.4 ln100 (whole) > 0.80+.. (neighbour) > part
    for m in (overlapping, whole, neighbour):
        full = m.mask(hw) & ~taken
        expected.append(full)
        taken |= full
    assert len(chosen) == 3
    for got, want in zip(chosen, expected):
        np.testing.assert_array_equal(got, want)
    # the part lies wholly on the whole: 100% > 30% overlap, dropped


def test_interior_point_by_hand():
    from napari_sam2.model.auto_stack import interior_point

    m = np.zeros((20, 30), bool)
    m[2:9, 10:25] = True  # 7 rows x 15 columns: the middle row, a column 3+ from each end
    x, y = interior_point(m)
    assert y == 5 and 13 <= x <= 21


# ---------------------------------------------------------------------- 2D


@pytest.mark.parametrize("case", range(len(CASES)), ids=["128px-uint16", "160x200-uint8", "256px-float32"])
def test_well_separated_blobs_give_one_mask_each(nano, case):
    from napari_sam2.model.auto_stack import segment_slice

    hw, centres, radii, dtype, lo, hi = CASES[case]
    image, truth = paint_blobs(hw, centres, radii, np.random.default_rng(case), lo, hi, dtype)
    labels = segment_slice(nano, image)
    assert labels.shape == hw
    assert len(np.unique(labels[labels > 0])) == len(centres), "one mask per blob, nothing else"
    matched = one_to_one(labels, truth)
    assert len({lab for lab, _ in matched.values()}) == len(centres), "each blob its own label"
    assert min(score for _, score in matched.values()) >= 0.7, matched


def test_bad_input_gets_clear_errors(nano):
    from napari_sam2.model.auto_stack import segment_slice, segment_stack

    with pytest.raises(InputError, match="segment_slice"):
        segment_stack(nano, np.zeros((64, 64), np.uint16))
    with pytest.raises(InputError, match="empty"):
        segment_stack(nano, np.zeros((0, 64, 64), np.uint16))
    with pytest.raises(InputError, match="empty"):
        segment_slice(nano, np.zeros((0, 64), np.uint16))
    nan = np.ones((6, 64, 64), np.float32)
    nan[3, 10, 10] = np.nan
    with pytest.raises(InputError, match="NaN"):
        segment_stack(nano, nan, key_slice=3)
    with pytest.raises(InputError, match="NaN"):
        segment_slice(nano, nan[3])
    with pytest.raises(InputError, match="unknown parameter"):
        segment_stack(nano, np.zeros((4, 64, 64), np.uint16), points_per_sid=8)
    with pytest.raises(InputError, match="every"):
        segment_stack(nano, np.zeros((4, 64, 64), np.uint16), every=0)
    with pytest.raises(InputError, match="key_slice"):
        segment_stack(nano, np.zeros((4, 64, 64), np.uint16), key_slice=9)


def test_an_empty_slice_gives_no_objects(nano):
    from napari_sam2.model.auto_stack import segment_stack

    flat = np.full((5, 64, 64), 700, np.uint16)
    assert segment_stack(nano, flat, intensity_range=(0, 4000)).max() == 0


# ---------------------------------------------------------------------- stacks


def test_stack_mode_finds_a_blob_that_appears_halfway_and_keeps_ids(nano):
    from napari_sam2.model.auto_stack import segment_stack

    image, truth = appearing_blob_stack()
    labels = segment_stack(nano, image)  # key slice 8: blob 2 is not there yet
    ids = [int(v) for v in np.unique(labels[labels > 0])]
    assert len(ids) == 2, ids
    matched = one_to_one(labels, truth)
    first, second = matched[1][0], matched[2][0]
    assert first != second and matched[1][1] >= 0.7 and matched[2][1] >= 0.6, matched
    # ids consistent: the drifting blob is one label on every slice
    for t in range(image.shape[0]):
        on_blob = labels[t][truth[t] == 1]
        assert (on_blob == first).mean() >= 0.8, (t, np.unique(on_blob, return_counts=True))
    # the late blob only as far as it exists (early stop: at most two absent slices before it)
    before = [t for t in range(11) if (labels[t] == second).any()]
    assert len(before) <= 2, before


def test_cancel_keeps_the_slices_done(nano):
    from napari_sam2.model.auto_stack import segment_stack

    image, _ = appearing_blob_stack(seed=1)
    snapshots = []
    full = segment_stack(nano, image, progress=lambda e: snapshots.append(None))
    events = {"n": 0}

    def progress(_e):
        events["n"] += 1

    partial = np.zeros(full.shape, np.uint32)
    segment_stack(nano, image, out=partial, progress=progress, should_stop=lambda: events["n"] >= 5)
    assert events["n"] == 5 < len(snapshots)
    assert partial.any()
    # what was done is what the full run had written by then, and stays in the full result
    done = partial > 0
    np.testing.assert_array_equal(partial[done], full[done])
    assert done.sum() < (full > 0).sum()


def test_out_labels_are_kept_and_counted_as_taken(nano):
    from napari_sam2.model.auto_stack import segment_stack

    image, truth = appearing_blob_stack(seed=2)
    mine = np.zeros(truth.shape, np.uint32)
    mine[truth == 1] = 7  # a user's label on the drifting blob
    before = mine.copy()
    segment_stack(nano, image, out=mine)
    np.testing.assert_array_equal(mine[before == 7], 7)
    new = [int(v) for v in np.unique(mine) if v not in (0, 7)]
    assert new and min(new) > 7, new
    assert one_to_one(mine, truth)[2][1] >= 0.6


# ---------------------------------------------------------------------- CLI


def test_cli_auto_writes_the_stack_labels(nano, tmp_path, capsys):
    import tifffile

    from napari_sam2.cli import main
    from napari_sam2.model.auto_stack import segment_stack

    image, _ = appearing_blob_stack(n=10, start=7, seed=3)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, image)
    assert main(["auto", str(src), "-o", str(tmp_path / "labels.tif"), "--quiet"]) == 0
    written = tifffile.imread(tmp_path / "labels.tif")
    np.testing.assert_array_equal(written, segment_stack(nano, image))  # the Python API on the same stack
    assert "objects through 10 slices" in capsys.readouterr().out
    # an existing file is not replaced, a missing one is named, bad parameters are refused in one line
    assert main(["auto", str(src), "-o", str(tmp_path / "labels.tif")]) == 1
    assert main(["auto", str(tmp_path / "nope.tif"), "-o", str(tmp_path / "x.tif")]) == 1
    assert main(["auto", str(src), "-o", str(tmp_path / "y.tif"), "--every", "0"]) == 1
    err = capsys.readouterr().err
    assert "exists" in err and "nope.tif" in err and "every must be at least 1" in err
    assert "Traceback" not in err


def test_cli_auto_on_a_2d_image(nano, tmp_path):
    import tifffile

    from napari_sam2.cli import main

    hw, centres, radii, dtype, lo, hi = CASES[0]
    image, _truth = paint_blobs(hw, centres, radii, np.random.default_rng(0), lo, hi, dtype)
    tifffile.imwrite(tmp_path / "slice.tif", image)
    assert main(["auto", str(tmp_path / "slice.tif"), "-o", str(tmp_path / "out.tif")]) == 0
    written = tifffile.imread(tmp_path / "out.tif")
    assert written.shape == hw and len(np.unique(written[written > 0])) == len(centres)


# ---------------------------------------------------------------------- the controller


def annotator(nano, image, **kw):
    from napari_sam2.controller import Annotator

    ann = Annotator(nano, image, axis=0, displayed=(1, 2), **kw)
    said = []
    ann.on_status = said.append
    return ann, said


def test_controller_slice_objects_are_ordinary_objects(nano):
    image, truth = appearing_blob_stack(seed=4)
    ann, said = annotator(nano, image)
    assert ann.segment_everything((12, 0, 0), whole_stack=False)
    rows = ann.object_table()
    assert len(rows) == 2 and all(r.prompted_slices == [12] and r.filled_slices == 1 for r in rows), rows
    assert "2 new objects" in said[-1]
    matched = one_to_one(np.asarray(ann.labels[12]), truth[12])
    assert {lab for lab, _ in matched.values()} == {r.obj_id for r in rows}
    # a click corrects one object only: a negative click in the middle of blob 2's object
    obj2 = matched[2][0]
    other = np.asarray(ann.labels[12]) == matched[1][0]
    prompts = ann.prompts_on_slice((12, 0, 0))
    assert prompts[obj2].mask is not None  # its mask is its prompt
    changed = ann.sync_slice((12, 0, 0), clicks=[((12, 92.0, 90.0), True, obj2), ((12, 92.0, 103.0), True, obj2)])
    assert changed == [obj2]
    np.testing.assert_array_equal(np.asarray(ann.labels[12]) == matched[1][0], other)
    # propagation re-runs them from their own slice
    assert ann.propagate((12, 0, 0), "both")
    filled = {r.obj_id: r.filled_slices for r in ann.object_table()}
    assert filled[matched[1][0]] >= 12 and filled[obj2] >= 4, filled


def test_controller_whole_stack_undo_and_cancel(nano):
    image, truth = appearing_blob_stack(seed=5)
    user = np.zeros(truth.shape, np.uint16)
    user[:, :8, :8] = 3  # the user's own label, in a corner
    ann, _said = annotator(nano, image, labels=user.copy())
    before = np.array(ann.labels, copy=True)
    assert ann.segment_everything((8, 0, 0), whole_stack=True)
    full = np.array(ann.labels, copy=True)
    np.testing.assert_array_equal(full[user == 3], 3)  # never written
    ids = sorted(r.obj_id for r in ann.object_table())
    assert len(ids) == 2 and min(ids) > 3
    matched = one_to_one(full, truth)
    assert matched[1][1] >= 0.7 and matched[2][1] >= 0.6, matched
    assert ann.history and sorted(ann.history[-1]["objects"]) == ids  # resumable as a propagation
    assert ann.undo() == "auto"
    np.testing.assert_array_equal(np.asarray(ann.labels), before)
    assert ann.object_table() == [] and not ann.history

    # cancelled after its first slices: what was done stays, and is what the full run wrote there
    ann2, said2 = annotator(nano, image, labels=user.copy())
    seen = []

    def progress(searched, total):
        seen.append(searched)
        if len(seen) == 3:
            ann2.cancel()

    ended = []
    assert ann2.segment_everything((8, 0, 0), whole_stack=True, on_progress=progress, on_end=ended.append)
    assert ended == [False] and "cancelled" in said2[-1]
    part = np.asarray(ann2.labels)
    done = (part > 0) & (user == 0)
    assert done.any() and done.sum() < ((full > 0) & (user == 0)).sum()
    np.testing.assert_array_equal(part[done], full[done])
    assert len(ann2.object_table()) >= 1


def test_controller_refuses_the_whole_stack_on_a_2d_image(nano):
    from napari_sam2.controller import Annotator

    hw, centres, radii, dtype, lo, hi = CASES[0]
    image, _ = paint_blobs(hw, centres, radii, np.random.default_rng(0), lo, hi, dtype)
    ann = Annotator(nano, image, axis=None, displayed=(0, 1))
    errors = []
    ann.on_notify = lambda level, text: errors.append((level, text))
    assert not ann.segment_everything((0, 0), whole_stack=True)
    assert errors and errors[-1][0] == "error" and "2D" in errors[-1][1]
    assert ann.segment_everything((0, 0))  # this slice works
    assert len(ann.object_table()) == len(centres)


def test_controller_whole_stack_run_saves_and_resumes(nano, tmp_path):
    """The objects found are saved with their mask prompts, and the run replays as a propagation
    in a fresh annotator (no labels file): the same labels, up to a few pixels at edges."""
    image, _ = appearing_blob_stack(seed=7)
    ann, _ = annotator(nano, image)
    assert ann.segment_everything((8, 0, 0), whole_stack=True)
    path = ann.save(tmp_path / "run.sam2.json")
    fresh, _ = annotator(nano, image)
    fresh.resume(path, propagate=True)
    assert [r.obj_id for r in fresh.object_table()] == [r.obj_id for r in ann.object_table()]
    a, b = np.asarray(ann.labels), np.asarray(fresh.labels)
    assert a.any() and (a == b).mean() >= 0.999


def test_controller_tracks_waiting_objects_first(nano):
    """An object clicked on another slice and not propagated yet is tracked with the run, not
    found again as a new object."""
    image, truth = appearing_blob_stack(seed=8)
    ann, _ = annotator(nano, image)
    ann.sync_slice((4, 0, 0), clicks=[((4, 40.0, 40.0), True, 1)])  # blob 1 on slice 4
    assert ann.segment_everything((8, 0, 0), whole_stack=True)
    ids = sorted(r.obj_id for r in ann.object_table())
    matched = one_to_one(np.asarray(ann.labels), truth)
    assert matched[1][0] == 1 and matched[1][1] >= 0.7, matched  # blob 1 stays the user's object
    assert len(ids) == 2 and matched[2][0] in ids and matched[2][0] != 1, (ids, matched)


def test_controller_labels_given_during_a_run_are_not_reused(nano):
    image, _ = appearing_blob_stack(seed=9)
    ann, _ = annotator(nano, image)
    mine = []

    def progress(searched, total):
        if not mine:
            mine.append(ann.new_object())  # the user makes a new object while the run goes on

    assert ann.segment_everything((8, 0, 0), whole_stack=True, on_progress=progress)
    found = [r.obj_id for r in ann.object_table()]
    assert len(found) == 2 and mine[0] not in found, (mine, found)
    assert ann.next_label() > max(found + mine)


def test_controller_run_that_finds_nothing_leaves_nothing_to_undo(nano):
    ann, said = annotator(nano, np.full((6, 64, 64), 700, np.uint16), intensity_range=(0, 4000))
    assert ann.segment_everything((3, 0, 0), whole_stack=True)
    assert ann.object_table() == [] and not ann.can_undo and "found 0 new objects" in said[-1]
    with pytest.raises(InputError, match="key_slice"):
        from napari_sam2.model.auto_stack import StackAutoParams

        StackAutoParams(key_slice="middle")
    errors = []
    ann.on_notify = lambda level, text: errors.append(text)
    assert not ann.segment_everything((3, 0, 0), whole_stack=True, every=None)
    assert "every must be a number" in errors[-1]


def test_controller_on_transposed_axes_and_a_4d_image(nano):
    """Displayed axes (x, y) instead of (y, x), and a T-Z-Y-X image: labels land where the
    objects are, in the array's own axis order, at the time point asked for only."""
    from napari_sam2.controller import Annotator

    image, truth = appearing_blob_stack(seed=10)

    ann = Annotator(nano, image, axis=0, displayed=(2, 1))
    assert ann.segment_everything((8, 0, 0), whole_stack=True)
    matched = one_to_one(np.asarray(ann.labels), truth)
    assert matched[1][1] >= 0.7 and matched[2][1] >= 0.6, matched

    movie = np.stack([np.full_like(image, 400), image])  # T=2: nothing at t=0
    ann4 = Annotator(nano, movie, axis=1, displayed=(2, 3))
    assert ann4.segment_everything((1, 8, 0, 0), whole_stack=True)
    lab = np.asarray(ann4.labels)
    assert not lab[0].any()
    matched = one_to_one(lab[1], truth)
    assert matched[1][1] >= 0.7 and matched[2][1] >= 0.6, matched


@pytest.mark.parametrize("crop_layers", [0, 1])
def test_masks_at_points_after_generate_equal_a_fresh_generator(nano, crop_layers):
    """The embedding kept from generate() (whole image, or the last crop) is reused only when it
    is the whole image's: the masks equal those of a generator that never generated."""
    from napari_sam2.model.automatic import AutomaticMaskGenerator

    hw, centres, radii, dtype, lo, hi = CASES[1]
    image, _ = paint_blobs(hw, centres, radii, np.random.default_rng(1), lo, hi, dtype)
    other, _ = paint_blobs(hw, centres[::-1], radii, np.random.default_rng(2), lo, hi, dtype)
    points = [(cx, cy) for cy, cx in centres]
    used = AutomaticMaskGenerator(nano, points_per_side=8, crop_n_layers=crop_layers)
    used.generate(image)
    got = used.masks_at_points(image, points)
    used.masks_at_points(other, points)  # another image between: its embedding must not stay
    again = used.masks_at_points(image, points)
    want = AutomaticMaskGenerator(nano).masks_at_points(image, points)
    for a, b, c in zip(got, again, want):
        np.testing.assert_array_equal(a.mask(hw), c.mask(hw))
        np.testing.assert_array_equal(b.mask(hw), c.mask(hw))
        assert abs(a.predicted_iou - c.predicted_iou) < 1e-5
