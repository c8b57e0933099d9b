"""Automatic masks on one 2D image (issue 16, first part): parity with Meta's generator.

Meta's ``SAM2AutomaticMaskGenerator`` imports torchvision, which is not installed here;
``_torchvision_standin`` provides the pieces it uses (brute-force NMS, image transforms),
and that stand-in is checked against hand-made cases first.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import build_reference, ours_from_reference, require_reference
from _stacks import rgb_blobs
from _torchvision_standin import batched_nms, install

from napari_sam2.model.automatic import (
    AutomaticMaskGenerator,
    mask_boxes,
    nms,
    point_grid,
    stability_score,
)
from napari_sam2.model.preprocess import InputError


def test_standin_nms_on_hand_made_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # IoU(3, 0) = 90/100 > 0.5: box 0 goes; IoU(3, 1) = 72/128 > 0.5: box 1 goes; box 2 is apart
    assert batched_nms(boxes, scores, torch.zeros(4), 0.5).tolist() == [3, 2]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0, 2]), 0.5).tolist() == [3, 0, 1, 2]  # per category
    assert batched_nms(boxes, scores, torch.zeros(4), 0.95).tolist() == [3, 0, 1, 2]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.9])
def test_our_nms_equals_the_brute_force_one(threshold):
    g = torch.Generator().manual_seed(int(threshold * 10))
    xy = torch.rand(300, 2, generator=g) * 100
    wh = torch.rand(300, 2, generator=g) * 30 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(300, generator=g)
    assert nms(boxes, scores, threshold).tolist() == batched_nms(boxes, scores, torch.zeros(300), threshold).tolist()


def test_building_blocks_by_hand():
    np.testing.assert_allclose(point_grid(2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    m = torch.zeros(2, 5, 6, dtype=torch.bool)
    m[0, 1:3, 2:5] = True
    assert mask_boxes(m).tolist() == [[2, 1, 4, 2], [0, 0, 0, 0]]
    logits = torch.tensor([[[2.0, 0.5, -0.5, -2.0]]])  # > 1: one pixel; > -1: three
    assert float(stability_score(logits, 0.0, 1.0)[0]) == pytest.approx(1 / 3)
    with pytest.raises(InputError, match="unknown parameter"):
        AutomaticMaskGenerator(None, points_per_sid=4)
    with pytest.raises(InputError, match="between 0 and 1"):
        AutomaticMaskGenerator(None, pred_iou_thresh=2)


def _image(h=240, w=320, seed=0):
    return rgb_blobs(seed, h, w, count=12, margin=20, radius=(8, 25))


def test_automatic_masks_match_metas_generator():
    """2.1-tiny, identical random weights, 1024 px input (the size Meta's predictor assumes). Random weights give scattered
    masks whose boxes all span the image, so box NMS (tested above) is set not to merge
    them; the predicted-IoU and stability thresholds sit inside their distributions, so
    that both filters remove masks and hundreds remain."""
    require_reference()
    install()
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    size = 1024
    ref = build_reference("sam2.1_hiera_tiny", seed=0, image_size=size)
    with torch.no_grad():  # sharper logits: stability scores spread over (0, 1)
        for mlp in ref.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(20.0)
            mlp.layers[-1].bias.mul_(20.0)
    ours = ours_from_reference("sam2.1_hiera_tiny", ref, image_size=size)
    img = _image()
    kw = {"points_per_side": 8, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.45, "box_nms_thresh": 1.0}
    theirs = SAM2AutomaticMaskGenerator(ref, **kw).generate(img)
    mine = AutomaticMaskGenerator(ours, **kw).generate(img)
    assert len(theirs) >= 20
    assert 8 * 8 * 3 > len(theirs)  # the filters removed some
    assert len(mine) == len(theirs)

    def key_ref(a):
        return (round(a["point_coords"][0][0], 2), round(a["point_coords"][0][1], 2), round(a["predicted_iou"], 3))

    def key_ours(b):
        return (round(b.point[0], 2), round(b.point[1], 2), round(b.predicted_iou, 3))

    for a, b in zip(sorted(theirs, key=key_ref), sorted(mine, key=key_ours)):
        ma, mb = a["segmentation"], b.mask(img.shape[:2])
        assert (ma & mb).sum() / (ma | mb).sum() >= 0.99
        assert abs(a["predicted_iou"] - b.predicted_iou) < 1e-3
        assert abs(a["stability_score"] - b.stability_score) < 1e-3
        assert list(b.box) == [int(a["bbox"][0]), int(a["bbox"][1]), int(a["bbox"][0] + a["bbox"][2]),
                               int(a["bbox"][1] + a["bbox"][3])]
