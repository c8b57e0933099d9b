"""The embedding store (issue 17): features read back equal freshly computed ones, a session
reading them gives the same masks, and a store made otherwise is refused."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from test_auto_stack import appearing_blob_stack

from napari_sam2.model import InputError, build_model, get_config
from napari_sam2.model.frames import FrameSource
from napari_sam2.model.video import StackSession
from napari_sam2.store import build_store, open_store


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(get_config("sam2.1_hiera_tiny").with_image_size(128))


def test_store_features_equal_fresh_ones_and_sessions_agree(tmp_path, tiny):
    image, _ = appearing_blob_stack(n=6, start=3, seed=30)
    frames = FrameSource(image)
    out = build_store(tmp_path / "s.sam2.zarr", tiny, frames)
    assert not (tmp_path / "s.sam2.zarr.partial").exists()
    store = open_store(out, tiny, FrameSource(image))
    fresh = StackSession(tiny, FrameSource(image))
    for f in (0, 3, 5):
        a, b = store.features(f), fresh.encode_frame(f)
        torch.testing.assert_close(a.image_embed, b.image_embed, rtol=0, atol=1e-6)
        for x, y in zip(a.high_res, b.high_res):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.pos, b.pos, rtol=0, atol=1e-6)
    # a session reading the store computes the masks a plain session computes
    reading = StackSession(tiny, FrameSource(image), compute_features=store.features)
    for s in (fresh, reading):
        s.add_points(2, 1, points=[[40, 40]], labels=[1])
    want = dict(fresh.propagate("both"))
    got = dict(reading.propagate("both"))
    assert want.keys() == got.keys()
    for f in want:
        np.testing.assert_array_equal(got[f][1], want[f][1])


def test_a_mismatched_store_is_refused(tmp_path, tiny):
    image, _ = appearing_blob_stack(n=3, start=1, seed=31)
    out = build_store(tmp_path / "s.sam2.zarr", tiny, FrameSource(image))
    torch.manual_seed(1)
    other = build_model(get_config("sam2.1_hiera_tiny").with_image_size(128))
    with pytest.raises(InputError, match="another weights"):
        open_store(out, other, FrameSource(image))
    with pytest.raises(InputError, match="another input size"):
        torch.manual_seed(0)
        open_store(out, build_model(get_config("sam2.1_hiera_tiny").with_image_size(256)), FrameSource(image))
    with pytest.raises(InputError, match="intensities"):
        open_store(out, tiny, FrameSource(image, (0, 100)))
    with pytest.raises(InputError, match="shape"):
        open_store(out, tiny, FrameSource(image[:2]))
    with pytest.raises(FileExistsError):
        build_store(out, tiny, FrameSource(image))
    with pytest.raises(InputError, match="not an embedding store|no embedding store"):
        open_store(tmp_path / "nothing.zarr", tiny, FrameSource(image))


def test_cli_embed_here_and_on_a_local_cluster(tmp_path):
    from napari_sam2.batch import BatchSettings, get_model
    from napari_sam2.cli import main

    image, _ = appearing_blob_stack(n=10, start=5, seed=32)
    tifffile.imwrite(tmp_path / "st.tif", image)
    assert main(["embed", str(tmp_path / "st.tif")]) == 0
    assert main(["embed", str(tmp_path / "st.tif"), "--out", str(tmp_path / "c.sam2.zarr"), "--workers", "2"]) == 0
    nano = get_model(BatchSettings())
    here = open_store(tmp_path / "st.sam2.zarr", nano, FrameSource(image))
    there = open_store(tmp_path / "c.sam2.zarr", nano, FrameSource(image))
    for f in range(10):
        torch.testing.assert_close(here.features(f).image_embed, there.features(f).image_embed, rtol=0, atol=1e-5)
    assert main(["embed", str(tmp_path / "st.tif")]) == 1  # exists: not replaced


def test_a_store_of_another_stack_of_the_same_shape_is_refused(tmp_path, tiny):
    image, _ = appearing_blob_stack(n=3, start=1, seed=33)
    other, _ = appearing_blob_stack(n=3, start=1, seed=34)
    out = build_store(tmp_path / "s.sam2.zarr", tiny, FrameSource(image, (0, 4000)))
    with pytest.raises(InputError, match="another stack"):
        open_store(out, tiny, FrameSource(other, (0, 4000)))


def test_the_annotator_reads_a_matching_store_and_says_so(tmp_path, tiny):
    """The controller (what the widget drives) reads a matching store: the same labels as
    without it; a store for another contrast is not used, and the user is told either way."""
    from napari_sam2.controller import Annotator

    image, _ = appearing_blob_stack(n=6, start=3, seed=35)
    path = build_store(tmp_path / "s.sam2.zarr", tiny, FrameSource(image, (400, 4000)))
    results = {}
    for name, kwargs in (("none", {}), ("store", {"feature_store": path}),
                         ("other contrast", {"feature_store": path, "intensity_range": (0, 5000)})):
        kwargs.setdefault("intensity_range", (400, 4000))
        ann = Annotator(tiny, image, axis=0, displayed=(1, 2), **kwargs)
        said = []
        ann.on_notify = lambda level, text, said=said: said.append(text)
        ann.sync_slice((2, 0, 0), clicks=[((2, 40.0, 40.0), True, 1)])
        ann.propagate((2, 0, 0))
        results[name] = (np.array(ann.labels), " ".join(said))
    np.testing.assert_array_equal(results["store"][0], results["none"][0])
    assert "read from" in results["store"][1] and "store" not in results["none"][1]
    assert "computed instead" in results["other contrast"][1]


def test_a_store_refused_for_the_start_contrast_is_used_once_the_contrast_matches(tmp_path, tiny):
    from napari_sam2.controller import Annotator

    image, _ = appearing_blob_stack(n=4, start=2, seed=36)
    path = build_store(tmp_path / "s.sam2.zarr", tiny, FrameSource(image, (400, 4000)))
    ann = Annotator(tiny, image, axis=0, displayed=(1, 2), feature_store=path, intensity_range=(0, 5000))
    said = []
    ann.on_notify = lambda level, text: said.append(text)
    ann.sync_slice((1, 0, 0), clicks=[((1, 40.0, 40.0), True, 1)])
    assert "computed instead" in " ".join(said)
    ann.set_intensity_range((400, 4000))
    ann.sync_slice((1, 0, 0), clicks=[((1, 40.0, 40.0), True, 1), ((1, 42.0, 40.0), True, 1)])
    assert "read from" in said[-1], said
