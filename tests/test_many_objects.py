"""Many objects in one session: own anchors, batched tracking, early stop, label seeds.

Every expectation comes from sessions that hold one object each (the engine's
plain path for a single object, which the reference parity tests pin down), or
from masks added by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _stacks import present_tiny_model

from napari_sam2.model import InputError, build_model, get_config
from napari_sam2.model.ensemble import EnsembleSession
from napari_sam2.model.video import StackSession

SIZE = 128
RANGE = (400, 2600)


def blobs(n=24, h=64, w=80, seed=0, count=10):
    """A stack of ``count`` drifting bright discs of different sizes on noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = rng.normal(500, 50, (n, h, w))
    centres = rng.uniform([8, 8], [h - 8, w - 8], (count, 2))
    radii = rng.uniform(3, 7, count)
    for t in range(n):
        for (cy, cx), r in zip(centres, radii):
            out[t][(yy - cy - 0.2 * t) ** 2 + (xx - cx) ** 2 < r**2] += 2000
    return out.astype(np.uint16), centres


def logits_by_frame(session, obj_id, **kwargs):
    """{frame: logits} of one object from one propagation (frames may repeat per sweep:
    the last value is kept, as a caller writing labels would)."""
    out = {}
    for f, masks in session.propagate(return_logits=True, **kwargs):
        if obj_id in masks:
            out[f] = masks[obj_id]
    return out


def test_two_objects_on_different_slices_equal_one_object_sessions(model):
    data, centres = blobs(count=2)
    prompts = {1: (5, centres[0]), 2: (20, centres[1])}
    together = StackSession(model, data, intensity_range=RANGE)
    for obj, (frame, (cy, cx)) in prompts.items():
        together.add_points(frame, obj, points=[[cx, cy + 0.2 * frame]], labels=[1])
    got = {1: {}, 2: {}}
    for f, masks in together.propagate("both", return_logits=True):
        for obj, m in masks.items():
            got[obj][f] = m
    for obj, (frame, (cy, cx)) in prompts.items():
        alone = StackSession(model, data, intensity_range=RANGE)
        alone.add_points(frame, obj, points=[[cx, cy + 0.2 * frame]], labels=[1])
        expected = logits_by_frame(alone, obj, direction="both")
        assert sorted(got[obj]) == sorted(expected) == list(range(24))
        for f in expected:
            np.testing.assert_allclose(got[obj][f], expected[f], atol=1e-4, err_msg=f"object {obj}, slice {f}")
            assert np.array_equal(got[obj][f] > 0, expected[f] > 0)


def test_backward_starts_at_each_objects_own_slice(model):
    """Issue 15 item 9: object 1 on slice 5, object 2 on slice 20, backward: object 2 is
    tracked from 20 down (it used to get nothing on slices 9-19)."""
    data, centres = blobs(count=2)
    s = StackSession(model, data, intensity_range=RANGE)
    s.add_points(5, 1, points=[[centres[0][1], centres[0][0] + 1]], labels=[1])
    s.add_points(20, 2, points=[[centres[1][1], centres[1][0] + 4]], labels=[1])
    frames = {1: [], 2: []}
    for f, masks in s.propagate("backward"):
        for obj in masks:
            frames[obj].append(f)
    assert frames[1] == list(range(5, -1, -1))
    assert frames[2] == list(range(20, -1, -1))


def test_ten_objects_batched_equal_ten_single_sessions(model):
    data, centres = blobs(n=10, count=10, seed=3)
    many = StackSession(model, data, intensity_range=RANGE)
    for obj, (cy, cx) in enumerate(centres, start=1):
        many.add_points(4, obj, points=[[cx, cy + 0.8]], labels=[1])
    steps = []
    original = many.step

    def counting_step(frame, obj_ids, reverse):
        steps.append(len(obj_ids))
        return original(frame, obj_ids, reverse)

    many.step = counting_step
    got = {}
    for f, masks in many.propagate("both", return_logits=True):
        got[f] = masks
    assert set(steps) == {10}  # every slice: one batch of all ten objects
    for obj, (cy, cx) in enumerate(centres, start=1):
        alone = StackSession(model, data, intensity_range=RANGE)
        alone.add_points(4, obj, points=[[cx, cy + 0.8]], labels=[1])
        for f, masks in alone.propagate("both", return_logits=True):
            np.testing.assert_allclose(got[f][obj], masks[obj], atol=1e-4, err_msg=f"object {obj}, slice {f}")
            assert np.array_equal(got[f][obj] > 0, masks[obj] > 0)


def test_batched_tracking_in_an_ensemble_equals_single_object_ensembles(model):
    data, centres = blobs(n=8, count=3, seed=5)
    many = EnsembleSession(model, data, orientations=2, intensity_range=RANGE)
    for obj, (cy, cx) in enumerate(centres, start=1):
        many.add_points(2 + obj, obj, points=[[cx, cy]], labels=[1])
    got = {}
    for f, masks in many.propagate("both", return_logits=True):
        for obj, m in masks.items():
            got[(obj, f)] = m
    for obj, (cy, cx) in enumerate(centres, start=1):
        alone = EnsembleSession(model, data, orientations=2, intensity_range=RANGE)
        alone.add_points(2 + obj, obj, points=[[cx, cy]], labels=[1])
        for f, masks in alone.propagate("both", return_logits=True):
            np.testing.assert_allclose(got[(obj, f)], masks[obj], atol=1e-4)


def absent_model():
    """A model whose object score says "absent" unless the memory pulls it up: tracking
    from a click stops soon, as it does past an object's end in real data."""
    return present_tiny_model(SIZE, seed=1, bias=-8.0)


def test_early_stop_leaves_exactly_the_expected_slices_and_can_be_filled(model):
    data, centres = blobs(n=16, count=2, seed=2)
    m = absent_model()
    cy, cx = centres[0]
    s = StackSession(m, data, intensity_range=RANGE)
    s.add_points(6, 1, points=[[cx, cy]], labels=[1])
    # the expectation: a full run's object scores, stop rule applied by hand
    scores = {}
    ref = StackSession(m, data, intensity_range=RANGE)
    ref.add_points(6, 1, points=[[cx, cy]], labels=[1])
    for f, ids, _low, sc in ref.propagate_logits("both"):
        scores[f] = float(sc[0])
    expected = set()
    for order in (range(6, 16), range(5, -1, -1)):
        run = 0
        for f in order:
            expected.add(f)
            run = run + 1 if scores[f] <= 0 else 0
            if run >= 2:
                break
    assert len(expected) < 16  # the rule does stop somewhere on this stack
    computed = {f for f, _ in s.propagate("both", stop_after_absent=2)}
    assert computed == expected
    assert s.skipped_frames(1) == sorted(set(range(16)) - expected)
    # without the limit a later propagation fills them, and clears the record
    filled = {f for f, _ in s.propagate("both")}
    assert filled == set(range(16)) and s.skipped_frames(1) == []


def test_object_range_limits_one_object(model):
    data, centres = blobs(n=12, count=2)
    s = StackSession(model, data, intensity_range=RANGE)
    for obj, (cy, cx) in enumerate(centres, start=1):
        s.add_points(5, obj, points=[[cx, cy + 1]], labels=[1])
    frames = {1: set(), 2: set()}
    for f, masks in s.propagate("both", object_ranges={2: (3, 7)}):
        for obj in masks:
            frames[obj].add(f)
    assert frames == {1: set(range(12)), 2: set(range(3, 8))}
    with pytest.raises(InputError, match="unknown object"):
        list(s.propagate("both", obj_ids=[9]))
    with pytest.raises(InputError, match="stop_after_absent"):
        list(s.propagate("both", stop_after_absent=0))


def test_only_selected_objects_are_tracked(model):
    data, centres = blobs(n=8, count=3)
    s = StackSession(model, data, intensity_range=RANGE)
    for obj, (cy, cx) in enumerate(centres, start=1):
        s.add_points(2, obj, points=[[cx, cy]], labels=[1])
    seen = set()
    for _f, masks in s.propagate("forward", obj_ids=[2]):
        seen |= set(masks)
    assert seen == {2}


def test_add_labels_equals_masks_added_by_hand(model):
    data, centres = blobs(n=6, count=3, seed=4)
    yy, xx = np.mgrid[0 : data.shape[1], 0 : data.shape[2]]
    lab = np.zeros(data.shape[1:], np.uint16)
    for obj, (cy, cx) in zip((3, 7, 12), centres):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = obj
    seeded = StackSession(model, data, intensity_range=RANGE)
    got_slice = seeded.add_labels(2, lab, return_logits=True)
    by_hand = StackSession(model, data, intensity_range=RANGE)
    for obj in (3, 7, 12):
        want_slice = by_hand.add_mask(2, obj, lab == obj, return_logits=True)
    assert set(got_slice) == {3, 7, 12}
    for obj in (3, 7, 12):
        np.testing.assert_array_equal(got_slice[obj], want_slice[obj])
    a = dict(seeded.propagate("both", return_logits=True))
    b = dict(by_hand.propagate("both", return_logits=True))
    for f in b:
        for obj in (3, 7, 12):
            np.testing.assert_array_equal(a[f][obj], b[f][obj])


def test_add_label_volume_prompts_each_object_on_its_largest_slice(model):
    data, _ = blobs(n=6, count=1)
    vol = np.zeros(data.shape, np.int32)
    vol[1, 10:14, 10:14] = 4  # object 4: 16 px on slice 1, 36 px on slice 3
    vol[3, 10:16, 10:16] = 4
    vol[4, 30:40, 40:50] = 9  # object 9 only on slice 4
    s = StackSession(model, data, intensity_range=RANGE)
    assert s.add_label_volume(vol) == {4: 3, 9: 4}
    by_hand = StackSession(model, data, intensity_range=RANGE)
    by_hand.add_mask(3, 4, vol[3] == 4)
    by_hand.add_mask(4, 9, vol[4] == 9)
    for (fa, ma), (fb, mb) in zip(s.propagate("forward"), by_hand.propagate("forward")):
        assert fa == fb and ma.keys() == mb.keys()
        for obj in ma:
            np.testing.assert_array_equal(ma[obj], mb[obj])


def test_bad_label_seeds_are_refused(model):
    data, _ = blobs(n=4, count=1)
    s = StackSession(model, data, intensity_range=RANGE)
    with pytest.raises(InputError, match="shape"):
        s.add_labels(0, np.zeros((3, 3), np.uint16))
    with pytest.raises(InputError, match="no object"):
        s.add_labels(0, np.zeros(data.shape[1:], np.uint16))
    with pytest.raises(InputError, match="integers"):
        s.add_label_volume(np.zeros(data.shape, np.float32))


def test_overlaps_go_to_the_higher_logit(model):
    data, centres = blobs(n=4, count=2, seed=6)
    cy, cx = centres[0]
    kw = {"intensity_range": RANGE}
    plain = StackSession(model, data, **kw)
    exclusive = StackSession(model, data, non_overlap=True, **kw)
    for s in (plain, exclusive):  # two objects clicked on the same disc: they overlap
        s.add_points(1, 1, points=[[cx, cy]], labels=[1])
        s.add_points(1, 2, points=[[cx + 1, cy]], labels=[1])
    for (f, logits), (_, masks) in zip(plain.propagate("forward", return_logits=True), exclusive.propagate("forward")):
        both = (logits[1] > 0) & (logits[2] > 0)
        winner1 = both & (logits[1] >= logits[2])
        assert not (masks[1] & masks[2]).any()
        assert np.array_equal(masks[1][both], winner1[both]), f


def test_scrolling_a_fixed_axis_keeps_memory_bounded(model):
    """Scrolling T through a T-Z-Y-X movie with prefetch: sessions without objects are
    dropped and older ones keep no slice features, so memory does not grow per time point."""
    from napari_sam2.segmenter import StackSegmenter

    data = np.random.default_rng(0).integers(0, 4000, (12, 3, 32, 40)).astype(np.uint16)
    seg = StackSegmenter(model, data, axis=1, displayed=(2, 3), intensity_range=RANGE)
    seg.set_points((0, 1, 0, 0), 1, [[10, 10]], [1])  # an object on time point 0
    for t in range(12):
        seg.prefetch((t, 1, 0, 0), [0, 1, 2])
    assert len(seg.sessions) <= seg.keep_sessions + 1  # the newest ones and the one with an object
    cached = [s for s in seg.sessions.values() if s.features.nbytes > 0]
    assert len(cached) <= seg.keep_sessions
    assert seg.session((0, 1, 0, 0)).objects  # the prompted time point kept its object
    done = [index for index, _ in seg.propagate((0, 1, 0, 0), "forward")]
    assert [i[:2] for i in done] == [(0, 1), (0, 2)]  # slices 1 and 2 of time point 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_tracking_on_cuda_equals_one_object_sessions(model):
    """On CUDA too, objects tracked in one batch give what each tracked alone gives (same
    device, so the comparison is about batching, not about CPU / GPU arithmetic)."""
    data, centres = blobs(n=8, count=6, seed=7)
    gpu_model = build_model(get_config("sam2.1_hiera_tiny").with_image_size(SIZE))
    gpu_model.load_state_dict(model.state_dict())
    gpu_model = gpu_model.cuda()
    prompts = {obj: (1 + obj % 3, [[cx, cy]]) for obj, (cy, cx) in enumerate(centres, start=1)}
    many = StackSession(gpu_model, data, intensity_range=RANGE)
    for obj, (frame, pts) in prompts.items():
        many.add_points(frame, obj, points=pts, labels=[1])
    got = {}
    for f, masks in many.propagate("both"):
        for obj, m in masks.items():
            got[(obj, f)] = m
    differ = total = 0
    for obj, (frame, pts) in prompts.items():
        alone = StackSession(gpu_model, data, intensity_range=RANGE)
        alone.add_points(frame, obj, points=pts, labels=[1])
        for f, masks in alone.propagate("both"):
            differ += int((got[(obj, f)] != masks[obj]).sum())
            total += masks[obj].size
    assert differ / total < 0.002


def test_restored_object_survives_pruning_by_a_later_propagation(model):
    """Undo restores an object as it was, even after a propagation pruned the memories the
    live state shared with the snapshot (regression: the restored state had lost them)."""
    data, centres = blobs(n=40, count=1, seed=8)
    cy, cx = centres[0]
    s = StackSession(model, data, intensity_range=RANGE)
    s.add_points(2, 1, points=[[cx, cy]], labels=[1])
    s.add_points(35, 1, points=[[cx, cy + 7]], labels=[1])
    snap = s.snapshot(1)
    s.clear_frame(2, 1)  # the user deletes the click on slice 2 ...
    list(s.propagate("both"))  # ... propagates (slice 2's memory is pruned) ...
    s.restore(1, snap)  # ... and undoes the deletion
    got = {f: m[1] for f, m in s.propagate("both", return_logits=True)}
    fresh = StackSession(model, data, intensity_range=RANGE)
    fresh.add_points(2, 1, points=[[cx, cy]], labels=[1])
    fresh.add_points(35, 1, points=[[cx, cy + 7]], labels=[1])
    want = {f: m[1] for f, m in fresh.propagate("both", return_logits=True)}
    assert got.keys() == want.keys()
    for f, logits in want.items():
        np.testing.assert_allclose(got[f], logits, atol=1e-4, err_msg=f"slice {f}")


def test_early_stop_takes_the_object_up_again_at_its_own_prompt():
    data, centres = blobs(n=16, count=1, seed=2)
    m = absent_model()
    cy, cx = centres[0]
    s = StackSession(m, data, intensity_range=RANGE)
    s.add_points(2, 1, points=[[cx, cy]], labels=[1])
    s.add_points(12, 1, points=[[cx, cy + 2]], labels=[1])
    frames = [f for f, _ in s.propagate("forward", stop_after_absent=1)]
    assert 12 in frames  # taken up again at the user's own click on slice 12
    assert not set(range(4, 12)) & set(frames)  # after stopping in between
    assert set(s.skipped_frames(1)) >= set(range(4, 12))


def test_a_prompt_on_a_skipped_slice_is_no_longer_skipped():
    data, centres = blobs(n=12, count=1, seed=2)
    cy, cx = centres[0]
    s = StackSession(absent_model(), data, intensity_range=RANGE)
    s.add_points(2, 1, points=[[cx, cy]], labels=[1])
    list(s.propagate("forward", stop_after_absent=1))
    assert 9 in s.skipped_frames(1)
    s.add_points(9, 1, points=[[cx, cy + 1.4]], labels=[1])  # the user prompts a left-out slice
    assert 9 not in s.skipped_frames(1)
