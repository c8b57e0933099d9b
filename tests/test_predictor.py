"""Image predictor: input handling and clear errors (no reference needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam2.model import ImagePredictor, InputError, build_model, get_config
from napari_sam2.model.preprocess import to_unit_rgb


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return ImagePredictor(build_model(get_config("sam2.1_hiera_tiny").with_image_size(256)))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (60, 90), dtype=np.uint8)


def test_uint16_range_maps_like_contrast_limits():
    arr = np.array([[100, 150, 200, 5000]], dtype=np.uint16)
    out = to_unit_rgb(arr, (100, 200))
    assert out.shape == (3, 1, 4)
    np.testing.assert_allclose(out[0, 0].numpy(), [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(out[2].numpy(), out[0].numpy())  # grey -> RGB


def test_uint8_matches_reference_scaling():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(to_unit_rgb(arr, (0, 255))[1].numpy(), arr.astype(np.float32) / 255.0)


@pytest.mark.parametrize(
    "img,rng",
    [
        (np.random.default_rng(1).random((40, 50)).astype(np.float32), None),
        (np.random.default_rng(1).integers(0, 4000, (40, 50)).astype(np.uint16), (0, 4000)),
        (np.random.default_rng(1).integers(0, 255, (40, 50, 3)).astype(np.uint8), None),
        (np.random.default_rng(1).integers(0, 255, (40, 50, 4)).astype(np.uint8), None),
        (np.random.default_rng(1).integers(-5, 5, (40, 50)).astype(np.int32), None),
    ],
    ids=["float", "uint16", "rgb", "rgba", "int32"],
)
def test_dtypes_and_shapes(predictor, img, rng):
    predictor.set_image(img, intensity_range=rng)
    out = predictor.predict(points=[[10, 20]], labels=[1])
    assert out.masks.shape == (3, 40, 50) and out.masks.dtype == bool
    assert out.iou.shape == (3,)
    assert out.low_res_logits.shape == (3, 64, 64)


def test_intensity_range_changes_model_input(predictor):
    img = np.array([[0, 1000], [2000, 65535]], dtype=np.uint16)
    a = predictor.prepare_image(img, (0, 2000))
    b = predictor.prepare_image(img, (0, 65535))
    assert not torch.allclose(a, b)


def test_single_mask_and_mask_roundtrip(predictor, image):
    predictor.set_image(image)
    first = predictor.predict(points=[[10, 20]], labels=[1], multimask_output=False)
    assert first.masks.shape == (1, 60, 90)
    again = predictor.predict(points=[[10, 20]], labels=[1], mask_input=first.low_res_logits, multimask_output=False)
    assert again.masks.shape == (1, 60, 90)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"points": [[100, 10]], "labels": [1]}, "outside the image"),
        ({"points": [[10, -3]], "labels": [1]}, "outside the image"),
        ({"points": [[10, 10], [20, 20]], "labels": [1]}, "one entry per point"),
        ({"points": [[10, 10]]}, "given together"),
        ({"points": [[10, 10]], "labels": [5]}, "1 \\(positive\\) or 0"),
        ({"points": [[10, 10, 3]], "labels": [1]}, "shape \\(N, 2\\)"),
        ({"points": [[np.nan, 10]], "labels": [1]}, "NaN"),
        ({"box": [10, 10, 5]}, "x0, y0, x1, y1"),
        ({"box": [50, 10, 20, 30]}, "x0 <= x1"),
        ({"box": [0, 0, 200, 30]}, "outside the image"),
        ({}, "at least one prompt"),
        ({"mask_input": np.zeros((10, 10))}, "low-resolution logits"),
    ],
)
def test_bad_prompts_are_explained(predictor, image, kwargs, match):
    predictor.set_image(image)
    with pytest.raises(InputError, match=match):
        predictor.predict(**kwargs)


@pytest.mark.parametrize(
    "img,match",
    [
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.zeros((5, 10, 10, 3), np.uint8), "2D image"),
        (np.zeros((10,), np.uint8), "2D image"),
        (np.full((10, 10), np.nan, np.float32), "NaN"),
        (np.array([["a"]]), "numbers"),
    ],
)
def test_bad_images_are_explained(predictor, img, match):
    with pytest.raises(InputError, match=match):
        predictor.set_image(img)


def test_bad_intensity_range(predictor, image):
    with pytest.raises(InputError, match="intensity_range"):
        predictor.set_image(image, intensity_range=(10, 1))


def test_predict_before_set_image():
    p = ImagePredictor(build_model(get_config("sam2.1_hiera_tiny").with_image_size(128)))
    with pytest.raises(InputError, match="set_image"):
        p.predict(points=[[1, 1]], labels=[1])


def test_several_boxes_with_shared_points(predictor, image):
    predictor.set_image(image)
    out = predictor.predict(box=[[0, 0, 30, 30], [20, 20, 80, 50]], points=[[25, 25]], labels=[1], multimask_output=False)
    assert out.masks.shape == (2, 1, 60, 90)


def test_bfloat16_mode_agrees_with_float32(image):
    torch.manual_seed(3)
    model = build_model(get_config("sam2.1_hiera_tiny").with_image_size(256))
    yy, xx = np.mgrid[0:60, 0:90]
    img = ((((yy - 30) ** 2 + (xx - 45) ** 2) < 300) * 200 + 20).astype(np.uint8)
    exact, fast = ImagePredictor(model), ImagePredictor(model, fast=True)
    exact.set_image(img)
    fast.set_image(img)
    a = exact.predict(points=[[45, 30]], labels=[1], multimask_output=False, return_logits=True)
    b = fast.predict(points=[[45, 30]], labels=[1], multimask_output=False, return_logits=True)
    # random weights amplify rounding; the logits must still correlate strongly
    corr = np.corrcoef(a.logits.ravel(), b.logits.ravel())[0, 1]
    assert corr > 0.95


def test_batches_of_different_sizes_on_one_image(image):
    """Prompts decoded in a batch of 64 and then a batch of 7 on the same image give what a
    fresh predictor gives for those 7 alone (the decoder caches image-only projections)."""
    torch.manual_seed(0)
    model = build_model(get_config("sam2.1_hiera_tiny").with_image_size(128))
    rng = np.random.default_rng(0)
    many = torch.from_numpy(rng.uniform(0, 60, (64, 1, 2)).astype(np.float32))
    few = torch.from_numpy(rng.uniform(0, 60, (7, 1, 2)).astype(np.float32))
    warm = ImagePredictor(model)
    warm.set_image(image)
    warm.predict_batch(many, torch.ones(64, 1, dtype=torch.int32))
    low, iou = warm.predict_batch(few, torch.ones(7, 1, dtype=torch.int32))
    fresh = ImagePredictor(model)
    fresh.set_image(image)
    low_ref, iou_ref = fresh.predict_batch(few, torch.ones(7, 1, dtype=torch.int32))
    torch.testing.assert_close(low, low_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(iou, iou_ref, rtol=1e-4, atol=1e-4)


def test_images_and_stacks_share_one_default_intensity_mapping(predictor):
    """Without a range, an image is mapped as a stack is: the model profile's percentiles
    (0.5, 99.5), so one hot pixel does not squash the rest to black; uint8 keeps 0..255."""
    from napari_sam2.model.frames import FrameSource

    rng = np.random.default_rng(3)
    img = rng.normal(300, 40, (40, 50)).astype(np.float32)
    img[5, 5] = 60000  # a hot pixel
    lo, hi = np.percentile(img.astype(np.float64), (0.5, 99.5))
    assert predictor.model.config.profile.percentiles == (0.5, 99.5)
    torch.testing.assert_close(predictor.prepare_image(img), predictor.prepare_image(img, (lo, hi)))
    assert FrameSource.for_model(predictor.model, img[None]).intensity_range == pytest.approx((lo, hi))
    u8 = (img / img.max() * 255).astype(np.uint8)
    torch.testing.assert_close(predictor.prepare_image(u8), predictor.prepare_image(u8, (0, 255)))


def test_a_huge_frame_is_mapped_from_a_regular_sample(monkeypatch):
    from napari_sam2.model import preprocess

    rng = np.random.default_rng(0)
    img = rng.gamma(2.0, 300.0, (300, 301)).astype(np.float32)
    img[0, 0] = np.nan
    exact = preprocess.default_intensity_range(img)
    finite = img.astype(np.float64).ravel()
    assert exact == pytest.approx(tuple(np.percentile(finite[np.isfinite(finite)], (0.5, 99.5))))
    monkeypatch.setattr(preprocess, "MAX_RANGE_VALUES", 1000)  # 90300 values: every 91st
    sample = img.ravel()[::91].astype(np.float64)
    assert preprocess.default_intensity_range(img) == pytest.approx(
        tuple(np.percentile(sample[np.isfinite(sample)], (0.5, 99.5))))


def test_a_frame_source_keeps_its_own_mapping(predictor):
    from napari_sam2.model.frames import FrameSource

    stack = np.random.default_rng(1).normal(500, 50, (3, 20, 20))
    src = FrameSource(stack, (0, 1000))
    assert FrameSource.for_model(predictor.model, src) is src
    assert FrameSource.for_model(predictor.model, src, (0, 1000), nonfinite="error") is src
    with pytest.raises(InputError, match="already a FrameSource with its own intensity_range"):
        FrameSource.for_model(predictor.model, src, (0, 10))
    with pytest.raises(InputError, match="own nonfinite"):
        FrameSource.for_model(predictor.model, src, nonfinite="background")
