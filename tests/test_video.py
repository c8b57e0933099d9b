"""Stack session behaviour without the reference: frames, memory bounds, editing, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _stacks import disc_stack
from scipy import ndimage

from napari_sam2.model import InputError, build_model, get_config
from napari_sam2.model.frames import FrameSource
from napari_sam2.model.postprocess import fill_holes, non_overlapping, remove_islands
from napari_sam2.model.video import StackSession

SIZE = 128  # model input size for these tests: fast, same code paths


def stack(n=12, h=48, w=64, seed=0, dtype=np.uint16):
    """One bright disc drifting down through ``n`` slices of noise."""
    return disc_stack(n, h, w, [(20, 30, 1, 0, 100, 2000)], seed=seed, background=(500, 50), dtype=dtype)


class CountingArray:
    """An array-like that records which slices were read."""

    def __init__(self, data):
        self.data, self.reads = data, []
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, i):
        self.reads.append(i)
        return self.data[i]


# ---------------------------------------------------------------- frame source


def test_frames_are_read_lazily_with_one_mapping(model):
    data = CountingArray(stack(20))
    src = FrameSource(data, intensity_range=(400, 2600))
    assert data.reads == []  # nothing read until needed
    session = StackSession(model, src)
    session.add_points(3, 1, points=[[30, 23]], labels=[1])
    assert data.reads == [3]
    x = src.model_input(3, SIZE)
    expected = np.clip((data.data[3].astype(np.float32) - 400) / 2200, 0, 1)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(expected)[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True
    )
    np.testing.assert_allclose(x[0, 0].numpy(), ref[0, 0].numpy(), atol=1e-6)


def test_default_range_is_robust_percentiles():
    data = stack(10)
    data[0, 0, 0] = 65535  # one hot pixel must not set the range
    src = FrameSource(data)
    lo, hi = np.percentile(data.astype(np.float64).ravel(), (0.5, 99.5))
    assert src.intensity_range == pytest.approx((lo, hi))
    assert hi < 65535


def test_dask_and_memmap_sources(model, tmp_path):
    da = pytest.importorskip("dask.array")
    data = stack(6)
    mm = np.lib.format.open_memmap(tmp_path / "s.npy", mode="w+", dtype=data.dtype, shape=data.shape)
    mm[:] = data
    results = []
    for arr in (data, da.from_array(data, chunks=(1, 48, 64)), np.load(tmp_path / "s.npy", mmap_mode="r")):
        s = StackSession(model, arr, intensity_range=(400, 2600))
        s.add_points(0, 1, points=[[30, 20]], labels=[1])
        results.append({f: m[1] for f, m in s.propagate("forward")})
    for other in results[1:]:
        for f in results[0]:
            assert np.array_equal(results[0][f], other[f])


def test_tifffile_backed_source(model, tmp_path):
    tifffile = pytest.importorskip("tifffile")
    data = stack(5)
    tifffile.imwrite(tmp_path / "s.tif", data)
    mm = tifffile.memmap(tmp_path / "s.tif")
    s = StackSession(model, mm, intensity_range=(400, 2600))
    s.add_points(2, 1, points=[[30, 22]], labels=[1])
    assert sorted(f for f, _ in s.propagate("both")) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- propagation


def test_propagation_order_and_range(model):
    s = StackSession(model, stack(12), intensity_range=(400, 2600))
    s.add_points(5, 1, points=[[30, 25]], labels=[1])
    assert [f for f, _ in s.propagate("forward")] == list(range(5, 12))
    assert [f for f, _ in s.propagate("backward")] == list(range(5, -1, -1))
    assert [f for f, _ in s.propagate("both")] == list(range(5, 12)) + list(range(4, -1, -1))
    assert [f for f, _ in s.propagate("both", frame_range=(3, 7))] == [5, 6, 7, 4, 3]


def test_stop_early_keeps_results_and_can_resume(model):
    s = StackSession(model, stack(12), intensity_range=(400, 2600))
    s.add_points(0, 1, points=[[30, 20]], labels=[1])
    got = {}
    for f, masks in s.propagate("forward"):
        got[f] = masks[1]
        if f == 4:
            break  # the caller stops (e.g. Cancel)
    assert sorted(got) == [0, 1, 2, 3, 4]
    again = {f: m[1] for f, m in s.propagate("forward")}
    for f, mask in got.items():  # what was computed before stopping is what a full run gives
        assert np.array_equal(mask, again[f])


def test_objects_added_after_propagation(model):
    s = StackSession(model, stack(8), intensity_range=(400, 2600))
    s.add_points(0, 1, points=[[30, 20]], labels=[1])
    list(s.propagate("forward"))
    s.add_points(3, 2, points=[[10, 40]], labels=[1])
    seen = {}
    for f, masks in s.propagate("both"):  # a slice may come once per sweep, with other objects
        seen.setdefault(f, set()).update(masks)
    assert seen == {f: {1, 2} for f in range(8)}


def test_corrections_as_conditioning_are_kept(model):
    s = StackSession(model, stack(10), intensity_range=(400, 2600), corrections_as_conditioning=True)
    s.add_points(0, 1, points=[[30, 20]], labels=[1])
    list(s.propagate("forward"))
    fixed = s.add_points(6, 1, points=[[30, 26], [5, 5]], labels=[1, 0])[1]
    assert s.objects[1].prompted_frames == [0, 6]
    again = dict(s.propagate("forward"))
    assert np.array_equal(again[6][1], fixed)  # the corrected slice is not re-tracked


def test_clear_and_remove(model):
    s = StackSession(model, stack(6), intensity_range=(400, 2600))
    s.add_points(0, 1, points=[[30, 20]], labels=[1])
    s.add_points(0, 2, points=[[10, 10]], labels=[1])
    s.remove_object(2)
    assert s.obj_ids == [1]
    s.clear_frame(0, 1)
    with pytest.raises(InputError, match="no prompt on any slice"):
        list(s.propagate())
    with pytest.raises(InputError, match="unknown object id 7"):
        s.remove_object(7)


def test_memory_stays_bounded_on_long_stacks(model):
    sizes = {}
    for n in (40, 120):
        s = StackSession(model, stack(n), intensity_range=(400, 2600), feature_cache_mb=4)
        s.add_points(0, 1, points=[[30, 20]], labels=[1])
        for _ in s.propagate("forward"):
            pass
        sizes[n] = s.state_nbytes
        assert s.features.nbytes <= 4 * 2**20 or len(s.features) == 1
    per_slice_ptr = 256 * 4 + 8  # an object pointer and a score are all that stay per slice
    assert sizes[120] - sizes[40] <= 80 * per_slice_ptr


def test_pruned_memory_matches_unpruned_results(model):
    """Pruning only drops what the model can no longer attend to."""
    a = StackSession(model, stack(40), intensity_range=(400, 2600))
    b = StackSession(model, stack(40), intensity_range=(400, 2600), keep_memory=True)  # never prune
    for s in (a, b):
        s.add_points(0, 1, points=[[30, 20]], labels=[1])
    ra, rb = dict(a.propagate("forward")), dict(b.propagate("forward"))
    for f in ra:
        assert np.array_equal(ra[f][1], rb[f][1])


def test_non_overlap_option(model):
    s = StackSession(model, stack(4), intensity_range=(400, 2600), non_overlap=True)
    s.add_points(0, 1, points=[[30, 20]], labels=[1])
    m2 = s.add_points(0, 2, points=[[30, 20]], labels=[1])
    assert not (m2[1] & m2[2]).any()


# ---------------------------------------------------------------- post-processing


def _reference_small_components(binary, max_area):
    lab, n = ndimage.label(binary, structure=np.ones((3, 3)))
    out = np.zeros_like(binary)
    for i in range(1, n + 1):
        if (lab == i).sum() <= max_area:
            out |= lab == i
    return out


def test_fill_holes_against_scipy():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0.5, 1.0, (3, 1, 40, 40)).astype(np.float32))
    filled = fill_holes(logits, 8)
    for i in range(3):
        bg = logits[i, 0].numpy() <= 0
        holes = _reference_small_components(bg, 8)
        expected = np.where(holes, 0.1, logits[i, 0].numpy())
        np.testing.assert_array_equal(filled[i, 0].numpy(), expected)
    assert holes.any()


def test_remove_islands_against_scipy():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(-0.5, 1.0, (1, 1, 40, 40)).astype(np.float32))
    out = remove_islands(logits, 5)
    islands = _reference_small_components(logits[0, 0].numpy() > 0, 5)
    np.testing.assert_array_equal(out[0, 0].numpy(), np.where(islands, -10.0, logits[0, 0].numpy()))


def test_non_overlapping_keeps_best_object():
    x = torch.tensor([[[[1.0, -2.0]]], [[[3.0, -1.0]]]])
    y = non_overlapping(x)
    assert y[0, 0, 0, 0] <= -10 and y[1, 0, 0, 0] == 3.0
    assert y[1, 0, 0, 1] == -1.0 and y[0, 0, 0, 1] <= -10


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "frames,match",
    [
        (np.zeros((32, 32), np.uint8), "single 2D image"),
        (np.zeros((0, 32, 32), np.uint8), "empty"),
        (np.zeros((3, 32, 32, 5), np.uint8), "shape"),
        (np.array([[["a"]]]), "real numbers"),
    ],
)
def test_bad_stacks(model, frames, match):
    with pytest.raises(InputError, match=match):
        StackSession(model, frames)


def test_nan_slice_is_reported(model):
    data = stack(4).astype(np.float32)
    data[2, 3, 3] = np.nan
    s = StackSession(model, data, intensity_range=(0, 3000))
    with pytest.raises(InputError, match="slice 2 contains NaN"):
        s.add_points(2, 1, points=[[3, 3]], labels=[1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"frame": 9, "points": [[3, 3]], "labels": [1]}, "outside the stack"),
        ({"frame": -1, "points": [[3, 3]], "labels": [1]}, "outside the stack"),
        ({"frame": 0, "points": [[70, 3]], "labels": [1]}, "outside the slice"),
        ({"frame": 0, "points": [[3, 3]]}, "together"),
        ({"frame": 0}, "points with labels, or a box"),
        ({"frame": 0, "points": [[3, 3]], "labels": [1, 1]}, "one entry per point"),
        ({"frame": 0, "box": [10, 10, 5, 5]}, "x0 <= x1"),
    ],
)
def test_bad_prompts(model, kwargs, match):
    s = StackSession(model, stack(4), intensity_range=(400, 2600))
    rest = {k: v for k, v in kwargs.items() if k != "frame"}  # the parameter table stays as it is
    with pytest.raises(InputError, match=match):
        s.add_points(kwargs["frame"], 1, **rest)


def test_bad_mask_and_direction(model):
    s = StackSession(model, stack(4), intensity_range=(400, 2600))
    with pytest.raises(InputError, match="slice's shape"):
        s.add_mask(0, 1, np.ones((3, 3), bool))
    with pytest.raises(InputError, match="no object has a prompt"):
        list(s.propagate())
    s.add_points(0, 1, points=[[3, 3]], labels=[1])
    with pytest.raises(InputError, match="direction"):
        list(s.propagate("sideways"))


# ---------------------------------------------------------------- devices


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(model):
    cpu = StackSession(model, stack(6), intensity_range=(400, 2600))
    gpu_model = build_model(get_config("sam2.1_hiera_tiny").with_image_size(SIZE))
    gpu_model.load_state_dict(model.state_dict())
    gpu = StackSession(gpu_model.cuda(), stack(6), intensity_range=(400, 2600), offload_state=True)
    for s in (cpu, gpu):
        s.add_points(0, 1, points=[[30, 20]], labels=[1])
    a = dict(cpu.propagate("forward", return_logits=True))
    b = dict(gpu.propagate("forward", return_logits=True))
    for f in a:
        assert np.abs(a[f][1] - b[f][1]).max() < 1e-2


def test_sweeps_visit_each_object_from_its_anchor_within_its_limits():
    """The order the session and the training clip share, written out by hand: object 1
    anchored on slice 3 of 0..6, object 2 on slice 5 limited to 4..6."""
    from napari_sam2.model.tracking import plan_sweeps

    anchors, limits = {1: 3, 2: 5}, {1: (0, 6), 2: (4, 6)}
    fwd, bwd = plan_sweeps(anchors, limits, "both")
    assert (fwd.reverse, fwd.frames, bwd.reverse, bwd.frames) == (False, [3, 4, 5, 6], True, [4, 3, 2, 1, 0])
    assert [f for f in fwd.frames if fwd.active(f, 2)] == [5, 6]
    assert [f for f in bwd.frames if bwd.active(f, 2)] == [4]  # from the slice before its anchor
    assert [f for f in bwd.frames if bwd.active(f, 1)] == [2, 1, 0]
    (only,) = plan_sweeps(anchors, limits, "backward")
    assert only.reverse and [f for f in only.frames if only.active(f, 2)] == [5, 4]
    assert plan_sweeps({1: 0}, {1: (0, 6)}, "both")[-1].reverse is False  # nothing before slice 0


def test_a_prompted_slice_keeps_its_output_in_the_memory_bank():
    from napari_sam2.model.tracking import FrameOutput, MemoryBank

    def out(v):
        return FrameOutput(None, torch.full((1, 4), float(v)), torch.ones(1, 1), torch.zeros(1, 2, 2, 2))

    bank = MemoryBank()
    bank.add(2, out(1), prompted=False)
    bank.add(2, out(2), prompted=True)  # a prompt on a tracked slice replaces its output
    bank.add(2, out(3), prompted=False)  # tracking over it again does not
    assert list(bank.cond) == [2] and not bank.non_cond and bank.get(2).obj_ptr[0, 0] == 2
    copy = bank.copy()
    copy.cond[2].maskmem_features = None
    assert bank.cond[2].maskmem_features is not None
