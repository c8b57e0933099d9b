"""Small test stacks and helpers shared by the controller and widget tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def present_tiny_model(size: int = 128):
    """2.1-tiny at ``size`` px with seeded random weights whose object score says "present"."""
    from napari_sam2.model import build_model, get_config

    torch.manual_seed(0)
    m = build_model(get_config("sam2.1_hiera_tiny").with_image_size(size))
    with torch.no_grad():
        m.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(8.0)
    return m


def two_blob_volume(n=8, h=48, w=56, seed=0, dtype=np.uint16):
    """Two bright discs drifting through ``n`` slices of noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    v = rng.normal(1000, 60, (n, h, w))
    for t in range(n):
        v[t][(yy - 18 - t) ** 2 + (xx - 20) ** 2 < 80] += 1500
        v[t][(yy - 30) ** 2 + (xx - 40 + t) ** 2 < 60] += 1200
    return v.astype(dtype)


def paint_by_hand(labels, index, masks):
    """What a labels slice should hold after masks: each object's pixels replaced by its
    mask, other objects' pixels kept (written here, independent of the package)."""
    sl = labels[index]
    for obj, m in masks.items():
        sl[sl == obj] = 0
        sl[np.asarray(m, bool) & (sl == 0)] = obj
    labels[index] = sl


@pytest.fixture(autouse=True)
def drain_qt_workers(qtbot):
    """Let background workers (e.g. slice prefetch) finish before the viewer is torn down.
    Autouse in the widget test modules that import it."""
    yield
    from qtpy.QtCore import QThreadPool

    QThreadPool.globalInstance().waitForDone(60_000)
    qtbot.wait(10)


def click(viewer, widget, z, y, x):
    """Go to slice ``z`` of a Z-Y-X viewer and click at (y, x) in the widget's clicks layer."""
    step = list(viewer.dims.current_step)
    step[0] = z
    viewer.dims.current_step = tuple(step)
    widget.points_layer.add(np.array([[z, y, x]], float))
