"""Segment everything from the dock widget (Xvfb): the two buttons' actions, through public
widget methods; expectations are the generated truth and copies taken before a change."""

from __future__ import annotations

import numpy as np
from _stacks import drain_qt_workers  # noqa: F401 (an autouse fixture)
from test_auto_stack import appearing_blob_stack, one_to_one
from test_widget_objects import start

TIMEOUT = 60_000


def test_segment_all_buttons(make_napari_viewer, qtbot, nano, errors):
    image, truth = appearing_blob_stack(seed=6)
    viewer = make_napari_viewer()
    _layer, widget = start(viewer, qtbot, nano, image)
    step = list(viewer.dims.current_step)
    step[0] = 12
    viewer.dims.current_step = tuple(step)

    widget.segment_everything(whole_stack=False)  # "Segment all — this slice"
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)
    rows = widget.object_rows
    assert len(rows) == 2 and all(r.prompted_slices == [12] for r in rows), rows
    shown = np.asarray(widget.labels_layer.data)
    assert {lab for lab, _ in one_to_one(shown[12], truth[12]).values()} == {r.obj_id for r in rows}
    assert not shown[:12].any() and not shown[13:].any()
    before = shown.copy()

    widget.segment_everything(whole_stack=True)  # "Segment all — whole stack": the two are tracked, no new one
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)
    assert not errors, errors
    tracked = np.asarray(widget.labels_layer.data)
    assert sorted(r.obj_id for r in widget.object_rows) == sorted(r.obj_id for r in rows)
    matched = one_to_one(tracked, truth)
    assert matched[1][1] >= 0.7 and matched[2][1] >= 0.6, matched  # through the stack, not just slice 12
    widget.undo()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)
    np.testing.assert_array_equal(np.asarray(widget.labels_layer.data), before)
    assert [r.obj_id for r in widget.object_rows] == [r.obj_id for r in rows]

    widget.propagate("both")  # the objects found are ordinary objects
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)
    final = np.asarray(widget.labels_layer.data)
    matched = one_to_one(final, truth)
    assert matched[1][1] >= 0.7 and matched[2][1] >= 0.6, matched
    assert widget.status.startswith("Propagation finished")
