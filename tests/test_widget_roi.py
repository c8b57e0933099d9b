"""'Track new objects on: this view' in the dock widget (Xvfb): the region follows the
canvas, masks stay inside it and equal a session run by hand on the cropped array."""

from __future__ import annotations

import numpy as np
import pytest
from _stacks import click, drain_qt_workers, present_tiny_model  # noqa: F401 (drain_qt_workers: an autouse fixture)
from test_roi import LIMITS, by_hand_labels, wide_stack
from test_widget_objects import start

from napari_sam2.model.roi import Roi

TIMEOUT = 60_000


@pytest.fixture(scope="module")
def model():
    return present_tiny_model(64)


def test_work_in_this_view(make_napari_viewer, qtbot, model, errors):
    stack = wide_stack(n=5, seed=8)
    viewer = make_napari_viewer(show=True)  # drawn: the layer knows which pixels are on the canvas
    layer, widget = start(viewer, qtbot, model, stack)
    layer.contrast_limits = LIMITS
    viewer.camera.center = (0, 35, 52)
    viewer.camera.zoom = viewer.camera.zoom * 3
    qtbot.wait(100)  # the canvas redraws: the layer's visible pixels follow
    widget.work_in_view()
    region = widget.region
    assert isinstance(region, Roi), region
    assert region.shape[0] < 90 and region.shape[1] < 150  # a part of the slice, around the camera's centre
    assert region.top <= 35 < region.bottom and region.left <= 52 < region.right
    names = [lay.name for lay in viewer.layers]
    assert any(n.endswith("SAM2 region") for n in names)

    click(viewer, widget, 2, 32, 42)
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)
    widget.propagate("both")
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)
    assert not errors, errors
    want = by_hand_labels(model, stack, {1: ((region.top, region.left, region.bottom, region.right), (2, 42, 32))},
                          range(5))
    assert (want == 1).any()
    np.testing.assert_array_equal(np.asarray(widget.labels_layer.data), want)

    # back to whole slices: the outline goes, and a new object is tracked on the whole slice
    widget.configure(region="whole slices")
    assert widget.region is None
    assert not any(lay.name.endswith("SAM2 region") for lay in viewer.layers)
