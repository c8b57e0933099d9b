"""The object panel with a real viewer (Xvfb): table, select, delete, hide, undo of a
propagation, propagate selected objects in a range, save and resume.

Driven through public widget methods and napari layer events; expectations are copies
taken before a change, an engine session, hand counts, or a second viewer.
"""

from __future__ import annotations

import json

import numpy as np
from _stacks import click_objects, drain_qt_workers, present_tiny_model, two_blob_volume  # noqa: F401 (drain_qt_workers: an autouse fixture)

from napari_sam2.model.ensemble import open_session
from napari_sam2.model.frames import FrameSource
from napari_sam2.widgets import sam2_widget as sw

TIMEOUT = 60_000


volume = two_blob_volume


def start(viewer, qtbot, model, data):
    layer = viewer.add_image(data)
    widget = sw.SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.configure(image=layer, loaded_model=model, orientations=1)
    widget.start()
    qtbot.waitUntil(lambda: not widget.is_busy and widget.session_started, timeout=TIMEOUT)
    return layer, widget


def wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)



def two_objects(viewer, qtbot, widget):
    click_objects(viewer, qtbot, widget, [(3, 21, 20), (3, 30, 43)], propagate="both")


def test_object_table_select_delete_and_undo(make_napari_viewer, qtbot, model, errors):
    viewer = make_napari_viewer()
    _layer, widget = start(viewer, qtbot, model, volume())
    two_objects(viewer, qtbot, widget)
    labels = widget.labels_layer.data
    rows = {r.obj_id: r for r in widget.object_rows}
    assert sorted(rows) == [1, 2]
    for obj in (1, 2):  # counted by hand from the labels
        assert rows[obj].filled_slices == sum(bool((labels[z] == obj).any()) for z in range(8))
        assert rows[obj].prompted_slices == [3]
    before = labels.copy()
    widget.select_objects([1])
    assert widget.active_object == 1 and widget.selected_objects == [1]
    widget.delete_object(1)
    wait(qtbot, widget)
    assert not (widget.labels_layer.data == 1).any()
    np.testing.assert_array_equal(widget.labels_layer.data == 2, before == 2)
    assert list(widget.points_layer.features["object"]) == [2]  # its click went too
    assert [r.obj_id for r in widget.object_rows] == [2]
    widget.undo()
    wait(qtbot, widget)
    np.testing.assert_array_equal(widget.labels_layer.data, before)
    assert sorted(widget.points_layer.features["object"]) == [1, 2]
    assert [r.obj_id for r in widget.object_rows] == [1, 2]
    assert errors == []


def test_undo_a_propagation_and_hide_an_object(make_napari_viewer, qtbot, model, errors):
    viewer = make_napari_viewer()
    _layer, widget = start(viewer, qtbot, model, volume())
    click_objects(viewer, qtbot, widget, [(3, 21, 20)])
    one_slice = widget.labels_layer.data.copy()
    widget.propagate("forward")
    wait(qtbot, widget)
    assert widget.labels_layer.data[4:].any()
    widget.undo()
    wait(qtbot, widget)
    np.testing.assert_array_equal(widget.labels_layer.data, one_slice)
    widget.set_hidden(1, True)
    assert widget.hidden_objects == [1]
    assert widget.labels_layer.colormap.map(np.array([1]))[0][3] == 0  # drawn transparent
    widget.set_hidden(1, False)
    assert widget.labels_layer.colormap.map(np.array([1]))[0][3] > 0
    assert errors == []


def test_propagate_only_selected_objects_within_a_range(make_napari_viewer, qtbot, model, errors):
    viewer = make_napari_viewer()
    _layer, widget = start(viewer, qtbot, model, volume())
    click_objects(viewer, qtbot, widget, [(3, 21, 20), (3, 30, 43)])
    widget.configure(objects="selected", slices="2-5")
    widget.select_objects([2])
    widget.propagate("both")
    wait(qtbot, widget)
    data = widget.labels_layer.data
    assert {z for z in range(8) if (data[z] == 1).any()} == {3}
    assert {z for z in range(8) if (data[z] == 2).any()} <= {2, 3, 4, 5}
    assert (data[[2, 4, 5]] == 2).any()
    widget.configure(slices="five to nine")
    widget.propagate("both")
    assert any("range" in e for e in errors)


def test_a_box_drawn_in_the_shapes_layer(make_napari_viewer, qtbot, model, errors):
    viewer = make_napari_viewer()
    layer, widget = start(viewer, qtbot, model, volume())
    step = list(viewer.dims.current_step)
    step[0] = 5
    viewer.dims.current_step = tuple(step)
    widget.shapes_layer.add_rectangles(np.array([[5, 10, 12], [5, 10, 29], [5, 27, 29], [5, 27, 12]], float))
    wait(qtbot, widget)
    frames = FrameSource(np.asarray(layer.data), tuple(layer.contrast_limits))
    want = open_session(model, frames, corrections_as_conditioning=True).add_points(5, 1, box=[12, 10, 29, 27])[1]
    np.testing.assert_array_equal(widget.labels_layer.data[5] == 1, want)
    assert [r.prompted_slices for r in widget.object_rows] == [[5]]
    assert errors == []


def test_save_then_resume_in_a_new_viewer(make_napari_viewer, qtbot, model, errors, tmp_path):
    data = volume()
    viewer = make_napari_viewer()
    _layer, widget = start(viewer, qtbot, model, data)
    two_objects(viewer, qtbot, widget)
    widget.set_hidden(2, True)
    out = widget.save_labels(tmp_path / "cells")
    assert out.name == "cells.tif"
    record = json.loads((tmp_path / "cells.sam2.json").read_text())
    assert record["labels_file"] == "cells.tif"
    assert [o["id"] for o in record["objects"]] == [1, 2]
    assert record["settings"]["orientations"] == 1
    saved = widget.labels_layer.data.copy()

    other = make_napari_viewer()
    layer2 = other.add_image(data)
    fresh = sw.SAM2Widget(other)
    other.window.add_dock_widget(fresh)
    fresh.configure(image=layer2, loaded_model=model)
    fresh.resume(tmp_path / "cells.sam2.json")
    qtbot.waitUntil(lambda: fresh.session_started and not fresh.is_busy, timeout=TIMEOUT)
    np.testing.assert_array_equal(fresh.labels_layer.data, saved)
    assert [r.obj_id for r in fresh.object_rows] == [1, 2]
    assert fresh.hidden_objects == [2]
    assert fresh.orientations == 1
    # the prompts came back as clicks a user can move or delete
    assert sorted(fresh.points_layer.features["object"]) == [1, 2]
    assert fresh.new_object() == 3
    assert errors == []


def test_removing_the_clicks_layer_ends_the_session_and_keeps_labels(make_napari_viewer, qtbot, model, errors):
    viewer = make_napari_viewer()
    _layer, widget = start(viewer, qtbot, model, volume())
    click_objects(viewer, qtbot, widget, [(3, 21, 20)])
    labels = widget.labels_layer.data.copy()
    viewer.layers.remove(widget.points_layer)
    wait(qtbot, widget)
    assert not widget.session_started
    assert "session ended" in widget.status
    widget.shapes_layer.add_rectangles(np.array([[3, 5, 5], [3, 5, 15], [3, 15, 15], [3, 15, 5]], float))
    widget.new_object()
    np.testing.assert_array_equal(widget.labels_layer.data, labels)  # nothing erased, no traceback
    assert errors == []
