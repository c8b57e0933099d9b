"""Regions of interest: a session on a rectangle of the slices, in whole-slice coordinates.

The expectation is always a session run by hand on the cropped array (an ordinary
StackSession or EnsembleSession), its masks pasted into zeros by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from _stacks import present_tiny_model

from napari_sam2.model import InputError
from napari_sam2.model.ensemble import EnsembleSession, open_session
from napari_sam2.model.frames import FrameSource
from napari_sam2.model.roi import Roi, RoiSession
from napari_sam2.model.video import StackSession


@pytest.fixture(scope="module")
def model():
    return present_tiny_model(64)


def wide_stack(n=6, h=90, w=150, seed=3, dtype=np.uint16):
    """A wide noisy stack with three small bright discs drifting apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    v = rng.normal(500, 40, (n, h, w))
    for t in range(n):
        for cy, cx, r in ((30, 40, 6), (60, 100, 5), (20, 120, 4)):
            v[t][(yy - cy - t) ** 2 + (xx - cx + t) ** 2 < r * r] += 900
    return v.astype(dtype)


def pasted(part, top, left, shape):
    full = np.zeros(shape, bool)
    full[top : top + part.shape[0], left : left + part.shape[1]] = part
    return full


@pytest.mark.parametrize("orientations", [1, 2])
def test_roi_session_equals_a_session_on_the_cropped_array(model, orientations):
    stack = wide_stack()
    rng = (float(stack.min()), float(stack.max()))
    top, left, bottom, right = 10, 20, 60, 84  # not square, not at the origin
    crop = np.ascontiguousarray(stack[:, top:bottom, left:right])
    by_hand = (StackSession(model, crop, intensity_range=rng) if orientations == 1
               else EnsembleSession(model, crop, orientations=orientations, intensity_range=rng))
    roi = RoiSession(model, stack, Roi(top, left, bottom, right), orientations=orientations, intensity_range=rng)

    # a click (object 1) and a box (object 2), given in whole-slice coordinates
    got = roi.add_points(2, 1, points=[[42, 32]], labels=[1])
    want = by_hand.add_points(2, 1, points=[[42 - left, 32 - top]], labels=[1])
    assert got[1].shape == stack.shape[1:] and want[1].any() and not want[1].all()
    np.testing.assert_array_equal(got[1], pasted(want[1], top, left, stack.shape[1:]))
    got = roi.add_points(3, 2, box=[30, 40, 52, 58])
    want = by_hand.add_points(3, 2, box=[30 - left, 40 - top, 52 - left, 58 - top])
    for k in (1, 2):
        np.testing.assert_array_equal(got[k], pasted(want[k], top, left, stack.shape[1:]))

    got_run = list(roi.propagate("both"))
    want_run = list(by_hand.propagate("both"))
    assert [(z, sorted(m)) for z, m in got_run] == [(z, sorted(m)) for z, m in want_run]
    assert {z for z, _ in got_run} == set(range(len(stack)))
    for (_z, got_masks), (_, want_masks) in zip(got_run, want_run):
        for k, want_mask in want_masks.items():
            np.testing.assert_array_equal(got_masks[k], pasted(want_mask, top, left, stack.shape[1:]))
            assert not got_masks[k][:top].any() and not got_masks[k][:, right:].any()


def test_masks_and_label_seeds_in_whole_slice_coordinates(model):
    stack = wide_stack(seed=5)
    top, left = 40, 70
    roi = Roi.parse("40:90,70:150")
    assert (roi.top, roi.left, roi.bottom, roi.right) == (40, 70, 90, 150)
    crop = np.ascontiguousarray(stack[:, 40:90, 70:150])
    rng = (400.0, 1600.0)
    by_hand = StackSession(model, crop, intensity_range=rng)
    session = open_session(model, stack, roi=roi, intensity_range=rng)
    seeds = np.zeros(stack.shape[1:], np.int32)
    yy, xx = np.mgrid[0 : stack.shape[1], 0 : stack.shape[2]]
    seeds[(yy - 61) ** 2 + (xx - 99) ** 2 < 25] = 7
    got = session.add_labels(1, seeds)
    want = by_hand.add_mask(1, 7, seeds[40:90, 70:150] == 7)
    np.testing.assert_array_equal(got[7], pasted(want[7], top, left, stack.shape[1:]))
    logits = session.add_mask(1, 7, seeds == 7, return_logits=True)[7]
    assert logits.shape == stack.shape[1:] and (logits[:top] < -100).all()


def test_prompts_outside_the_region_are_refused_clearly(model):
    stack = wide_stack()
    session = RoiSession(model, stack, Roi(10, 20, 60, 84), intensity_range=(400, 1600))
    with pytest.raises(InputError, match=r"outside the region of interest \(rows 10:60, columns 20:84\)"):
        session.add_points(0, 1, points=[[100, 30]], labels=[1])
    with pytest.raises(InputError, match="outside the region of interest"):
        session.add_points(0, 1, box=[30, 5, 50, 40])  # starts above it
    mask = np.zeros(stack.shape[1:], bool)
    mask[55:65, 30:40] = True  # half below it
    with pytest.raises(InputError, match=r"50 pixel\(s\) outside the region"):
        session.add_mask(0, 1, mask)
    assert session.obj_ids == []  # nothing was taken
    with pytest.raises(InputError, match="reaches outside the 90 x 150 slice"):
        RoiSession(model, stack, Roi(0, 0, 91, 20))
    for bad in ("10:5,0:4", "a:b,c:d", (1, 2, 3)):
        with pytest.raises(InputError):
            Roi.parse(bad)


def test_regions_around_a_point_and_from_corners():
    # a square centred on the point, moved inside the slice near its edges
    assert Roi.around(x=50, y=40, side=20, shape=(100, 200)) == Roi(30, 40, 50, 60)
    assert Roi.around(x=2, y=98, side=20, shape=(100, 200)) == Roi(80, 0, 100, 20)
    assert Roi.around(x=5, y=5, side=300, shape=(100, 200)) == Roi(0, 0, 100, 200)
    # napari's canvas corners (row, col), partly off the image: clipped to the pixels covered
    assert Roi.from_corners([[-12.3, 40.2], [55.6, 260.0]], (100, 200)) == Roi(0, 40, 57, 200)
    with pytest.raises(InputError, match="does not cover any pixel"):
        Roi.from_corners([[-30, -30], [-10, -5]], (100, 200))


def test_nan_in_the_region_is_reported_by_the_stack(model):
    stack = wide_stack().astype(np.float32)
    stack[2, 15, 30] = np.nan  # inside the region
    stack[4, 80, 140] = np.nan  # outside: never read
    frames = FrameSource(stack, (400, 1600), nonfinite="background")
    session = RoiSession(model, frames, Roi(10, 20, 60, 84))
    session.add_points(2, 1, points=[[40, 30]], labels=[1])
    list(session.propagate("both"))
    assert session.frames.nonfinite_found() == [2]


# ---------------------------------------------------------------------- the controller

LIMITS = (400.0, 1600.0)


def by_hand_labels(model, stack, regions_clicks, slices):
    """Labels from one plain session per object on its cropped array (corrections kept as
    conditioning, as the annotator does), each mask pasted by hand; objects in id order."""
    labels = np.zeros(stack.shape, np.uint16)
    for obj_id, ((top, left, bottom, right), (frame, x, y)) in sorted(regions_clicks.items()):
        crop = np.ascontiguousarray(stack[:, top:bottom, left:right])
        s = StackSession(model, FrameSource(crop, LIMITS), corrections_as_conditioning=True)
        s.add_points(frame, obj_id, points=[[x - left, y - top]], labels=[1])
        for z, masks in s.propagate("both"):
            if z in slices:
                sl = labels[z, top:bottom, left:right]
                sl[masks[obj_id] & (sl == 0)] = obj_id
    return labels


def test_annotator_objects_in_their_own_regions_equal_sessions_on_crops(model, tmp_path):
    from napari_sam2.controller import Annotator

    stack = wide_stack(n=5, seed=8)
    ann = Annotator(model, stack, axis=0, displayed=(1, 2), intensity_range=LIMITS, roi="10:60,20:84")
    ann.set_prompts((2, 0, 0), 1, points=[(32, 42)], labels=[1])  # (row, col)
    assert ann.objects[1].roi == Roi(10, 20, 60, 84)
    ann.set_roi(Roi(30, 88, 90, 150))
    ann.set_prompts((1, 0, 0), 2, points=[(61, 99)], labels=[1])
    ann.propagate((1, 0, 0), objects=[1, 2])
    want = by_hand_labels(model, stack, {1: ((10, 20, 60, 84), (2, 42, 32)), 2: ((30, 88, 90, 150), (1, 99, 61))},
                          range(5))
    assert (want == 1).any() and (want == 2).any()
    np.testing.assert_array_equal(ann.labels, want)

    # a click outside the object's region is refused, and nothing changes
    errors = []
    ann.on_notify = lambda level, text: errors.append(text)
    before = ann.labels.copy()
    ann.set_prompts((3, 0, 0), 1, points=[(80, 140)], labels=[1])
    assert errors and "outside the region of interest (rows 10:60, columns 20:84)" in errors[-1]
    np.testing.assert_array_equal(ann.labels, before)
    assert 3 not in {k[0] for k in ann.objects[1].prompts}

    # save, resume in a new annotator: each object comes back in its own region
    path = ann.save(tmp_path / "s.sam2.json")
    again = Annotator(model, stack, axis=0, displayed=(1, 2), intensity_range=LIMITS)
    again.resume(path, propagate=True)
    assert again.objects[1].roi == Roi(10, 20, 60, 84) and again.objects[2].roi == Roi(30, 88, 90, 150)
    np.testing.assert_array_equal(again.labels, want)
    assert again.roi is None  # the resumed objects' regions are theirs, not the next object's

    # delete object 2, undo: it is tracked in its region again
    ann.delete_object(2)
    assert not (ann.labels == 2).any()
    ann.undo()
    ann.propagate((1, 0, 0), objects=[2])
    np.testing.assert_array_equal(ann.labels, want)


def test_automatic_region_is_a_model_sized_square_around_the_first_click(model):
    from napari_sam2.controller import Annotator

    stack = wide_stack(n=4, seed=9)
    ann = Annotator(model, stack, axis=0, displayed=(1, 2), intensity_range=LIMITS, roi="auto")
    ann.set_prompts((1, 0, 0), 1, points=[(22, 118)], labels=[1])
    # 64 px (the model's input) centred on the click, moved inside the 90 x 150 slice
    assert ann.objects[1].roi == Roi(0, 86, 64, 150)
    ann.propagate((1, 0, 0))
    np.testing.assert_array_equal(ann.labels, by_hand_labels(model, stack, {1: ((0, 86, 64, 150), (1, 118, 22))},
                                                             range(4)))
    with pytest.raises(InputError, match="outside the 90 x 150 slice"):
        ann.set_roi((0, 0, 100, 10))


def test_segment_everything_in_a_region_equals_it_on_the_cropped_array(nano):
    from test_auto_stack import appearing_blob_stack

    from napari_sam2.controller import Annotator

    image, _truth = appearing_blob_stack(n=6, hw=(200, 260), start=0, seed=12)
    limits = (float(image.min()), float(image.max()))
    crop = np.ascontiguousarray(image[:, 0:150, 0:160])
    by_hand = Annotator(nano, crop, axis=0, displayed=(1, 2), intensity_range=limits, orientations=1)
    assert by_hand.segment_everything((3, 0, 0))
    region = Annotator(nano, image, axis=0, displayed=(1, 2), intensity_range=limits, orientations=1,
                       roi=Roi(0, 0, 150, 160))
    assert region.segment_everything((3, 0, 0))
    want = np.zeros(image.shape, by_hand.labels.dtype)
    want[:, 0:150, 0:160] = by_hand.labels
    assert len(np.unique(want)) == 3  # both blobs, found on the crop
    np.testing.assert_array_equal(region.labels, want)
    assert all(o.roi == Roi(0, 0, 150, 160) for o in region.objects.values())


def test_many_region_sessions_keep_their_objects_when_features_are_evicted(model):
    """Twelve objects, each on its own region (more sessions than keep their slice features
    at once): every object propagates exactly as a session on its crop does."""
    from napari_sam2.controller import Annotator

    rng = np.random.default_rng(16)
    n, count = 3, 12
    yy, xx = np.mgrid[0:64, 0 : 64 * count]
    stack = rng.normal(500, 40, (n, 64, 64 * count))
    for t in range(n):
        for k in range(count):
            stack[t][(yy - 30 - t) ** 2 + (xx - 64 * k - 32) ** 2 < (5 + k % 4) ** 2] += 900
    stack = stack.astype(np.uint16)
    ann = Annotator(model, stack, axis=0, displayed=(1, 2), intensity_range=LIMITS, roi="auto")
    clicks = {}
    for k in range(count):
        obj = ann.new_object()
        ann.set_prompts((1, 0, 0), obj, points=[(31, 64 * k + 32)], labels=[1])
        clicks[obj] = ((0, 64 * k, 64, 64 * k + 64), (1, 64 * k + 32, 31))
    assert [ann.objects[i].roi for i in clicks] == [Roi(*r) for r, _c in clicks.values()]  # 64 px squares
    assert count > ann.segmenter.keep_regions
    ann.propagate((1, 0, 0))
    want = by_hand_labels(model, stack, clicks, range(n))
    assert all((want == i).any() for i in clicks)
    np.testing.assert_array_equal(ann.labels, want)


def test_segment_everything_tracks_objects_held_in_regions_first(nano):
    from test_auto_stack import appearing_blob_stack

    from napari_sam2.controller import Annotator

    image, truth = appearing_blob_stack(n=8, start=0, seed=14)
    ann = Annotator(nano, image, axis=0, displayed=(1, 2), intensity_range=(400.0, 4400.0), orientations=1,
                    roi=Roi(0, 0, 100, 100))
    ann.set_prompts((4, 0, 0), 1, points=[(40, 40)], labels=[1])  # blob 1, on its region
    ann.set_roi(None)
    assert ann.segment_everything((4, 0, 0), whole_stack=True)
    assert ann.objects[1].roi == Roi(0, 0, 100, 100)
    blob1 = [i for i in np.unique(ann.labels[truth == 1]) if i]
    assert blob1 == [1]  # tracked through the stack as object 1, not found again as a new object
    assert (ann.labels == 1).any(axis=(1, 2)).all()
    assert ann.objects[1].propagated == ann.objects[1].version


def test_resume_with_a_region_outside_the_image_keeps_the_chosen_region(model, tmp_path):
    from napari_sam2.controller import Annotator

    stack = wide_stack(n=3, seed=15)
    ann = Annotator(model, stack, axis=0, displayed=(1, 2), intensity_range=LIMITS, roi=Roi(10, 20, 60, 84))
    ann.set_prompts((1, 0, 0), 1, points=[(32, 42)], labels=[1])
    record = ann.session_record()
    record["objects"][0]["roi"] = [0, 0, 500, 500]  # damaged: beyond the 90 x 150 slices
    again = Annotator(model, stack, axis=0, displayed=(1, 2), intensity_range=LIMITS, roi="auto")
    with pytest.raises(InputError, match="outside the 90 x 150 slice"):
        again.resume(record)
    assert again.roi == "auto"
