"""Tracking in several orientations (model.ensemble): prompts land on the same place in
every view, one orientation is exactly a StackSession, eight are exactly equivariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam2.model import InputError, load_model
from napari_sam2.model.config import NANO
from napari_sam2.model.ensemble import (
    ORIENTATIONS,
    EnsembleSession,
    OrientedFrames,
    orient_xy,
)
from napari_sam2.model.frames import FrameSource
from napari_sam2.model.video import StackSession
from napari_sam2.sample_data import nuclei_3d
from napari_sam2.segmenter import StackSegmenter

SIDE = NANO.image_size  # slices at model size: no resampling, so symmetries are exact


@pytest.fixture(scope="module")
def model():
    return load_model(NANO.name)


@pytest.fixture(scope="module")
def volume():
    image, labels = nuclei_3d((8, SIDE, SIDE), n=6, seed=77, radius_xy=(12, 20))
    return image, labels


def np_orient(a, k, flip):
    """Orientation of a (..., H, W) numpy array, written independently of the module's."""
    a = np.rot90(a, k, axes=(-2, -1))
    return np.flip(a, -1) if flip else a


def pixel_xy(x, y, side, k, flip):
    """Where pixel (x, y) of a side x side slice goes, found with a marker image."""
    m = np.zeros((side, side), bool)
    m[int(y), int(x)] = True
    r, c = np.argwhere(np_orient(m, k, flip))[0]
    return float(c), float(r)


def central(labels_slice, k):
    from napari_sam2.model.evaluate import central_pixel

    return central_pixel(labels_slice == k)


@pytest.mark.parametrize("k,flip", ORIENTATIONS)
def test_prompt_coordinates_follow_the_pixels(k, flip):
    img = np.zeros((1, SIDE, SIDE), np.float32)
    rng = np.random.default_rng(k + 4 * flip)
    for x, y in rng.integers(0, SIDE, (5, 2)):
        img[:] = 0
        img[0, y, x] = 1.0
        view = OrientedFrames(FrameSource(img, intensity_range=(0, 1)), k, flip).model_input(0, SIDE)
        r, c = np.unravel_index(int(view[0, 0].argmax()), view.shape[-2:])
        assert orient_xy(np.array([[x, y]], np.float32), SIDE, k, flip)[0].tolist() == [c, r]
        assert pixel_xy(x, y, SIDE, k, flip) == (c, r)


def test_one_orientation_is_a_stack_session(model, volume):
    image, labels = volume
    xy = central(labels[4], 1)
    plain = StackSession(model, image)
    ens = EnsembleSession(model, image, orientations=1)
    a = plain.add_points(4, 1, points=[xy], labels=[1], return_logits=True)[1]
    b = ens.add_points(4, 1, points=[xy], labels=[1], return_logits=True)[1]
    np.testing.assert_array_equal(a, b)
    for (ta, ma), (tb, mb) in zip(plain.propagate("both", return_logits=True), ens.propagate("both", return_logits=True)):
        assert ta == tb
        np.testing.assert_array_equal(ma[1], mb[1])


@pytest.mark.parametrize("k,flip", [(1, False), (2, True), (3, True)])
def test_eight_orientations_are_equivariant(model, volume, k, flip):
    """Rotating / mirroring the stack and every prompt rotates / mirrors the result."""
    image, labels = volume
    x1, y1 = central(labels[4], 1)
    ys, xs = np.nonzero(labels[3] == 2)
    box = [xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2]

    def run(img, click, bx):
        s = EnsembleSession(model, img, orientations=8)
        first = s.add_points(4, 1, points=[click], labels=[1], return_logits=True)
        s.add_points(3, 2, box=bx)
        out = {t: m for t, m in s.propagate("both", start=3, return_logits=True)}
        return first, out

    x0b, y0b = pixel_xy(box[0], box[1], SIDE, k, flip)
    x1b, y1b = pixel_xy(box[2], box[3], SIDE, k, flip)
    turned_box = [min(x0b, x1b), min(y0b, y1b), max(x0b, x1b), max(y0b, y1b)]
    first, out = run(image, (x1, y1), box)
    first_t, out_t = run(np.ascontiguousarray(np_orient(image, k, flip)), pixel_xy(x1, y1, SIDE, k, flip), turned_box)
    np.testing.assert_allclose(np_orient(first[1], k, flip), first_t[1], atol=1e-3)
    assert sorted(out) == sorted(out_t) == list(range(8))
    for t in out:
        for obj in (1, 2):
            np.testing.assert_allclose(np_orient(out[t][obj], k, flip), out_t[t][obj], atol=1e-3)
    assert any((out[t][1] > 0).any() for t in out)  # something was segmented


def test_ensemble_mask_prompt_is_equivariant(model, volume):
    image, labels = volume
    mask = labels[4] == 3
    a = EnsembleSession(model, image, orientations=8).add_mask(4, 3, mask, return_logits=True)[3]
    b = EnsembleSession(model, np.ascontiguousarray(np_orient(image, 1, True)), orientations=8).add_mask(
        4, 3, np.ascontiguousarray(np_orient(mask, 1, True)), return_logits=True)[3]
    np.testing.assert_allclose(np_orient(a, 1, True), b, atol=1e-3)


def test_ensemble_agrees_with_its_members_by_hand(model, volume):
    """The 4-orientation result is the mean of four StackSessions on turned copies of the
    stack with turned clicks: their low-resolution logits turned back, each clamped to
    +-32, averaged, then upsampled to the slice (computed here by hand)."""
    image, labels = volume
    x, y = central(labels[4], 1)
    got = EnsembleSession(model, image, orientations=4).add_points(4, 1, points=[(x, y)], labels=[1], return_logits=True)[1]
    rng = FrameSource(image).intensity_range
    total = 0.0
    for k, flip in ORIENTATIONS[:4]:
        s = StackSession(model, np.ascontiguousarray(np_orient(image, k, flip)), intensity_range=rng)
        s.add_points(4, 1, points=[pixel_xy(x, y, SIDE, k, flip)], labels=[1])
        low = s.objects[1].latest(4).pred_masks[0, 0].numpy()
        back = np.rot90(np.flip(low, -1) if flip else low, -k)
        total = total + np.clip(back, -32, 32)
    mean = torch.from_numpy(np.ascontiguousarray(total / 4, dtype=np.float32))[None, None]
    expected = torch.nn.functional.interpolate(mean, size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-3)


def test_ensemble_edits_and_errors(model, volume):
    image, labels = volume
    s = EnsembleSession(model, image, orientations=2)
    with pytest.raises(InputError, match=r"x=500"):  # reported in the caller's coordinates
        s.add_points(2, 1, points=[[500, 3]], labels=[1])
    assert s.obj_ids == []  # nothing was half-added
    with pytest.raises(InputError, match="orientations must be one of"):
        EnsembleSession(model, image, orientations=3)
    with pytest.raises(InputError, match="no object has a prompt"):
        next(s.propagate())
    s.add_points(4, 1, points=[central(labels[4], 1)], labels=[1])
    s.add_points(4, 2, points=[central(labels[4], 2)], labels=[1])
    assert [m.obj_ids for m in s.members] == [[1, 2], [1, 2]]
    s.remove_object(1)
    assert [m.obj_ids for m in s.members] == [[2], [2]]
    first = next(s.propagate("forward", start=4))  # stop after one slice: still usable
    assert first[0] == 4 and set(first[1]) == {2}
    done = [t for t, _ in s.propagate("backward", start=4)]
    assert done == [4, 3, 2, 1, 0]
    s.reset()
    assert s.obj_ids == [] and s.state_nbytes == 0


def test_segmenter_builds_an_ensemble(model, volume):
    image, labels = volume
    seg = StackSegmenter(model, image, axis=0, displayed=(1, 2), orientations=4)
    assert isinstance(seg.session((0, 0, 0)), EnsembleSession)
    y, x = np.argwhere(labels[4] == 1).mean(0)
    mask = seg.set_points((4, 0, 0), 1, [[y, x]], [1])
    assert mask.shape == (SIDE, SIDE) and mask[int(y), int(x)]
    with pytest.raises(InputError, match="orientations"):
        StackSegmenter(model, image, axis=0, displayed=(1, 2), orientations=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ensemble_on_cuda_matches_cpu(volume):
    image, labels = volume
    xy = central(labels[4], 1)
    out = []
    for device in ("cpu", "cuda"):
        s = EnsembleSession(load_model(NANO.name, device=device), image, orientations=8)
        s.add_points(4, 1, points=[xy], labels=[1])
        out.append(np.stack([m[1] for _, m in s.propagate("both")]))
    assert (out[0] != out[1]).mean() < 0.002


def test_each_slice_is_encoded_once_for_all_orientations(model, volume, monkeypatch):
    image, labels = volume
    sizes = []
    real = model.frame_features
    monkeypatch.setattr(model, "frame_features", lambda x: (sizes.append(x.shape[0]), real(x))[1])
    s = EnsembleSession(model, image, orientations=8)
    s.add_points(4, 1, points=[central(labels[4], 1)], labels=[1])
    s.prefetch([3, 5])
    assert sizes == [8, 8, 8]
    list(s.propagate("both"))
    assert sizes == [8] * 8  # one batch of 8 views per slice, each slice once
