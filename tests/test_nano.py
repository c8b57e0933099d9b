"""Bundled weights (integrity checks), architecture recognition, the end-to-end evaluation."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from napari_sam2.model import CheckpointError, build_model, load_model
from napari_sam2.model import checkpoint as ckpt
from napari_sam2.model.config import NANO, get_config
from napari_sam2.model.evaluate import (
    ObjectScore,
    click_and_propagate,
    dice,
    error_shares,
    score_object,
    slice_table,
)


def test_bundled_weights_load_and_match_their_sum(bundled_nano):
    model, path, digest = bundled_nano
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.stat().st_size < 3 * 2**20  # float16: 1.25 M parameters in ~2.5 MB
    loaded = load_model(NANO.name)  # no checkpoint given: the bundled file
    for k, v in model.state_dict().items():
        assert torch.allclose(loaded.state_dict()[k], v.half().float()), k
    assert ckpt.model_for_checkpoint(path) == NANO.name


def test_damaged_or_missing_bundled_file_is_refused(bundled_nano, monkeypatch, tmp_path):
    _, path, _ = bundled_nano
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="reinstall"):
        load_model(NANO.name)
    monkeypatch.setattr(ckpt, "bundled_path", lambda name: tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_model(NANO.name)


def test_model_for_checkpoint_recognises_architectures(tmp_path):
    for name in ("sam2_hiera_tiny", "sam2.1_hiera_tiny", NANO.name):
        path = tmp_path / f"{name}.pt"
        torch.save({"model": build_model(get_config(name)).state_dict()}, path)
        assert ckpt.model_for_checkpoint(path) == name
    assert load_model(None, path).config.name == NANO.name  # the widget's "choose a file"
    with pytest.raises(CheckpointError, match="model name or a checkpoint"):
        load_model(None)
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(CheckpointError):
        ckpt.model_for_checkpoint(tmp_path / "x.pt")


def test_dice_and_slice_table_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    s1 = ObjectScore(1, 5, (0, 0), 0.9, per_slice={0: [1.0], 1: [0.8, 0.6]})
    s2 = ObjectScore(2, 7, (0, 0), 0.7, per_slice={0: [0.9], 20: [0.1]})
    rows = slice_table([s1, s2], max_distance=16)
    assert rows == [(0, pytest.approx(0.95), 2), (1, pytest.approx(0.7), 2), (16, pytest.approx(0.1), 1)]


def test_score_object_sorts_the_wrong_voxels_by_hand():
    gt = np.zeros((4, 3, 3), bool)
    gt[1:3, 0] = True  # 3 voxels on slices 1 and 2
    pred = np.zeros_like(gt)
    pred[1, 0, :2] = True  # 2 hits on slice 1 (1 missed)
    pred[2, 1, 0] = True  # slice 2: 3 missed, 1 beside the object
    pred[3, :2] = True  # slice 3, where the object is absent: 6 voxels
    s = score_object(9, 1, (0.0, 0.0), pred, gt)
    assert (s.hit_voxels, s.missed_voxels, s.extra_voxels, s.false_slice_voxels) == (2, 4, 1, 6)
    assert s.false_slices == 1
    assert s.dice_3d == pytest.approx(2 * 2 / (9 + 6))
    assert s.per_slice == {0: [pytest.approx(2 * 2 / 5)], 1: [0.0]}
    shares = error_shares([s, ObjectScore(3, 0, (0, 0), 1.0, missed_voxels=2)])
    assert shares == {"missed": pytest.approx(6 / 13), "beside": pytest.approx(1 / 13),
                      "absent slices": pytest.approx(6 / 13)}


def test_click_and_propagate_clicks_the_middle_of_each_object():
    """The protocol itself: one click at the centre of the middle slice of each object
    (tracked in the model profile's orientations, 8 for the nano architecture)."""
    labels = np.zeros((9, 64, 64), np.uint16)
    yy, xx = np.mgrid[:64, :64]
    for z in range(2, 7):  # object 1 on slices 2..6: middle slice 4
        labels[z][(yy - 20) ** 2 + (xx - 30) ** 2 <= 36] = 1
    for z in range(4):  # object 2 on slices 0..3: middle (1.5) -> slice 1 or 2
        labels[z][(yy - 45) ** 2 + (xx - 12) ** 2 <= 25] = 2
    image = (labels > 0).astype(np.float32) * 1000 + 100
    torch.manual_seed(0)
    model = build_model(NANO.with_image_size(64))
    scores = click_and_propagate(model, image, labels)
    assert [s.obj_id for s in scores] == [1, 2]
    assert scores[0].click_slice == 4 and scores[0].click_xy == (30.0, 20.0)
    assert scores[1].click_slice in (1, 2) and scores[1].click_xy == (12.0, 45.0)
    for s in scores:
        assert 0.0 <= s.dice_3d <= 1.0
        assert sum(len(v) for v in s.per_slice.values()) == (5 if s.obj_id == 1 else 4)
