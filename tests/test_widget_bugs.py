"""Regression tests for the bugs a new user found (issue 15), with a real viewer (Xvfb).

Each test drives the widget through napari layer events, its buttons' methods and
keys, and compares with an independent expectation: the engine's own session on the
same data, hand-made labels, or the file written.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import tifffile
from _stacks import (  # noqa: F401 (drain_qt_workers: an autouse fixture)
    click,
    click_objects,
    drain_qt_workers,
    present_tiny_model,
    two_blob_volume,
)

from napari_sam2.model.ensemble import open_session
from napari_sam2.model.frames import FrameSource
from napari_sam2.widgets import sam2_widget as sw

SIZE = 128
TIMEOUT = 60_000


volume = two_blob_volume


def start(make_napari_viewer, qtbot, model, data, *, before_start=None, **layer_kwargs):
    viewer = make_napari_viewer()
    layer = viewer.add_image(data, **layer_kwargs)
    widget = sw.SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.configure(image=layer, loaded_model=model, orientations=1)
    if before_start is not None:
        before_start(viewer, widget)
    widget.start()
    qtbot.waitUntil(lambda: not widget.is_busy and widget.session_started, timeout=TIMEOUT)
    return viewer, layer, widget


def wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)


def goto(viewer, z):
    step = list(viewer.dims.current_step)
    step[0] = z
    viewer.dims.current_step = tuple(step)


def engine(model, data, intensity_range, **kw):
    return open_session(model, FrameSource(np.asarray(data), intensity_range), orientations=1,
                        corrections_as_conditioning=True, **kw)


# ---------------------------------------------------------------- 1. write into an existing layer


def test_existing_labels_are_never_overwritten(make_napari_viewer, qtbot, model, notices):
    data = volume()
    mine = np.zeros(data.shape, np.uint16)
    mine[2:6, 14:23, 16:25] = 1  # the user's label 1 lies on the nucleus that will be tracked
    mine[0, :4, :4] = 2
    chosen = {}

    def choose(viewer, widget):
        chosen["layer"] = viewer.add_labels(mine.copy(), name="mine")
        widget.configure(output=chosen["layer"])

    viewer, _layer, widget = start(make_napari_viewer, qtbot, model, data, before_start=choose)
    lab = chosen["layer"]
    assert lab.selected_label == 3  # new objects start above the user's labels
    viewer.layers.selection.active = widget.points_layer
    click(viewer, widget, 4, 30, 40)
    wait(qtbot, widget)
    widget.propagate("both")
    wait(qtbot, widget)
    assert (lab.data == 3).any()
    # every voxel of the user's labels is still theirs
    np.testing.assert_array_equal(lab.data[mine == 1], 1)
    np.testing.assert_array_equal(lab.data[mine == 2], 2)
    # selecting a user's label and clicking starts a new object instead of taking label 1
    lab.selected_label = 1
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    np.testing.assert_array_equal(lab.data[mine == 1], 1)
    assert (lab.data[3] == 4).any()
    assert notices["error"] == []


def test_uint8_layer_holding_255_is_widened(make_napari_viewer, qtbot, model, notices):
    data = volume()
    mine = np.zeros(data.shape, np.uint8)
    mine[0, :3, :3] = 255
    chosen = {}

    def choose(viewer, widget):
        chosen["layer"] = viewer.add_labels(mine, name="mine8")
        widget.configure(output=chosen["layer"])

    viewer, _layer, widget = start(make_napari_viewer, qtbot, model, data, before_start=choose)
    lab = chosen["layer"]
    assert lab.selected_label == 256 and lab.data.dtype == np.uint16
    assert any("256" in m for m in notices["info"])
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    assert (lab.data[3] == 256).any() and (lab.data[0, :3, :3] == 255).all()
    assert notices["error"] == []


# ---------------------------------------------------------------- 2. calibration through to the file


def test_gui_opens_a_calibrated_file_and_saves_its_calibration(make_napari_viewer, qtbot, model, tmp_path, notices):
    from napari_sam2.cli import open_gui

    src = tmp_path / "cal.tif"
    data = volume(n=4)[None].repeat(3, axis=0)  # T Z Y X
    tifffile.imwrite(src, data, imagej=True, resolution=(1 / 0.325, 1 / 0.325),
                     metadata={"spacing": 2.0, "finterval": 60.0, "unit": "um", "axes": "TZYX"})
    viewer, widget = open_gui(src, model="sam2.1_hiera_small", viewer=make_napari_viewer())
    layer = viewer.layers[0]
    np.testing.assert_allclose(layer.scale, (60.0, 2.0, 0.325, 0.325))
    widget.configure(loaded_model=model, orientations=1)
    widget.start()
    qtbot.waitUntil(lambda: not widget.is_busy and widget.session_started, timeout=TIMEOUT)
    assert widget.axes == "TZYX"
    np.testing.assert_allclose(widget.labels_layer.scale, (60.0, 2.0, 0.325, 0.325))
    out = widget.save_labels(tmp_path / "labels")  # no extension typed
    assert out.name == "labels.tif"
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].axes == "TZYX"
        assert tif.imagej_metadata["spacing"] == pytest.approx(2.0)
        assert tif.imagej_metadata["finterval"] == pytest.approx(60.0)
        xres = tif.pages[0].tags["XResolution"].value
    assert xres[1] / xres[0] == pytest.approx(0.325, rel=1e-4)
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert notices["error"] == []


# ---------------------------------------------------------------- 4. click colours


def test_click_colours_follow_their_own_polarity(make_napari_viewer, qtbot, model, notices):
    viewer, _layer, widget = start(make_napari_viewer, qtbot, model, volume())
    from napari.utils.colormaps.standardize_color import transform_color

    green, red = transform_color(sw.POSITIVE_COLOR)[0], transform_color(sw.NEGATIVE_COLOR)[0]
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    widget.toggle_polarity()  # T: the existing positive click stays green
    np.testing.assert_allclose(widget.points_layer.face_color[0], green)
    click(viewer, widget, 3, 40, 50)
    wait(qtbot, widget)
    widget.toggle_polarity()  # T again: the negative click stays red
    np.testing.assert_allclose(widget.points_layer.face_color[0], green)
    np.testing.assert_allclose(widget.points_layer.face_color[1], red)
    assert list(widget.points_layer.features["positive"]) == [True, False]


# ---------------------------------------------------------------- 5. long messages


def test_long_message_does_not_widen_the_dock(make_napari_viewer, qtbot, model, notices, tmp_path):
    _viewer, _layer, widget = start(make_napari_viewer, qtbot, model, volume())
    window = widget.native.window()
    window.resize(1400, 900)
    qtbot.wait(50)
    width = window.width()
    # a model that cannot load, with a ~650-character path in its error message
    missing = tmp_path / ("very-long-folder-name-" * 9) / ("nested-" * 30) / ("checkpoint-" * 15 + ".pt")
    widget.configure(checkpoint=missing)
    widget.start()
    wait(qtbot, widget)
    qtbot.wait(50)
    assert len(widget.status_details) > 600
    assert widget.native.width() <= sw.DOCK_MAX_WIDTH
    assert window.width() <= width
    assert len(widget.status) <= sw.STATUS_CHARS and widget.status_details.startswith(widget.status[:100])


# ---------------------------------------------------------------- 6, 13. NaN voxels


def test_nan_voxel_is_background_and_an_error_is_not_called_finished(make_napari_viewer, qtbot, model, notices):
    data = volume().astype(np.float32)
    data[5, 10, 10] = np.nan
    viewer, _layer, widget = start(make_napari_viewer, qtbot, model, data, contrast_limits=(900, 2600))
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    widget.propagate("forward")
    wait(qtbot, widget)
    assert widget.status == "Propagation finished."
    assert any("slice(s) 5" in m and "background" in m for m in notices["warning"])
    # the expectation: the engine on the image with the NaN replaced by the low limit by hand
    fixed = data.copy()
    fixed[5, 10, 10] = 900
    ref = engine(model, fixed, (900, 2600))
    ref.add_points(3, 1, points=[[20, 21]], labels=[1])
    for z, masks in ref.propagate("forward"):
        np.testing.assert_array_equal(widget.labels_layer.data[z] == 1, masks[1], err_msg=f"slice {z}")


def test_propagation_error_stays_on_screen(make_napari_viewer, qtbot, model, notices, monkeypatch):
    viewer, _layer, widget = start(make_napari_viewer, qtbot, model, volume())
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    seg = widget.segmenter
    session = seg.session(viewer.dims.current_step)
    original = session.step

    def failing(frame, ids, reverse):
        if frame == 5:
            raise ValueError("slice 5 could not be read")
        return original(frame, ids, reverse)

    monkeypatch.setattr(session, "step", failing)
    widget.propagate("forward")
    wait(qtbot, widget)
    assert "error" in widget.status and "slice 5 could not be read" in widget.status
    assert "finished" not in widget.status
    assert widget.labels_layer.data[4].any()  # slices before it are kept


# ---------------------------------------------------------------- 7. contrast after the start


def test_contrast_change_reaches_the_model(make_napari_viewer, qtbot, model, notices):
    data = volume()
    viewer, layer, widget = start(make_napari_viewer, qtbot, model, data, contrast_limits=(0, 65535))
    layer.contrast_limits = (1100, 1600)
    qtbot.wait(20)
    wait(qtbot, widget)
    assert "1100" in widget.status
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    want = engine(model, data, (1100, 1600)).add_points(3, 1, points=[[20, 21]], labels=[1])[1]
    old = engine(model, data, (0, 65535)).add_points(3, 1, points=[[20, 21]], labels=[1])[1]
    assert (want != old).any()
    np.testing.assert_array_equal(widget.labels_layer.data[3] == 1, want)


def test_orientation_change_after_start_is_announced(make_napari_viewer, qtbot, model, notices):
    _viewer, _layer, widget = start(make_napari_viewer, qtbot, model, volume())
    widget.configure(orientations=4)
    assert "next Start session" in widget.status


# ---------------------------------------------------------------- 8. click during a propagation


def test_click_during_propagation_is_serialised(make_napari_viewer, qtbot, model, notices):
    data = volume(n=30)
    viewer, layer, widget = start(make_napari_viewer, qtbot, model, data)
    click(viewer, widget, 0, 18, 20)
    wait(qtbot, widget)
    session = widget.segmenter.session(viewer.dims.current_step)
    original = session.step

    def slow_step(frame, ids, reverse):  # slices take long enough to click between them
        time.sleep(0.1)
        return original(frame, ids, reverse)

    session.step = slow_step
    widget.propagate("forward")
    qtbot.waitUntil(lambda: widget.labels_layer.data[2].any(), timeout=TIMEOUT)
    assert widget.is_busy
    widget.new_object()
    click(viewer, widget, 10, 30, 48)  # while masks stream in
    wait(qtbot, widget)
    assert notices["error"] == []
    assert widget.status == "Propagation finished."
    assert (widget.labels_layer.data[29] == 1).any()  # the propagation went to the end
    rng = tuple(layer.contrast_limits)
    ref = engine(model, data, rng)
    ref.add_points(0, 1, points=[[20, 18]], labels=[1])
    tracked = {z: masks[1] for z, masks in ref.propagate("forward")}
    lab = widget.labels_layer.data
    for z, m1 in tracked.items():
        np.testing.assert_array_equal(lab[z] == 1, m1 & ~(lab[z] == 2), err_msg=f"slice {z}")
    alone = engine(model, data, rng).add_points(10, 2, points=[[48, 30]], labels=[1])[2]
    got2 = lab[10] == 2  # object 2 is its own mask, less what object 1 held first
    assert got2.any() and (got2 <= alone).all() and ((alone & ~tracked[10]) <= got2).all()


# ---------------------------------------------------------------- 9. backward from each object's slice


def test_backward_reaches_every_object_from_its_own_slice(make_napari_viewer, qtbot, model, notices):
    data = volume(n=24)
    viewer, layer, widget = start(make_napari_viewer, qtbot, model, data)
    click_objects(viewer, qtbot, widget, [(5, 23, 20), (20, 30, 40)], propagate="backward")
    ref = engine(model, data, tuple(layer.contrast_limits))
    ref.add_points(20, 2, points=[[40, 30]], labels=[1])
    for z, masks in ref.propagate("backward"):
        got = widget.labels_layer.data[z] == 2
        np.testing.assert_array_equal(got, masks[2] & ~(widget.labels_layer.data[z] == 1), err_msg=f"slice {z}")
    assert all((widget.labels_layer.data[z] == 2).any() for z in range(9, 20))


# ---------------------------------------------------------------- 10, 11. delete, undo, start again


def test_deleting_the_last_click_removes_the_object_and_its_labels(make_napari_viewer, qtbot, model, notices):
    viewer, _layer, widget = start(make_napari_viewer, qtbot, model, volume())
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    widget.propagate("both")
    wait(qtbot, widget)
    assert (widget.labels_layer.data == 1).sum(axis=(1, 2)).astype(bool).sum() == 8
    widget.new_object()  # another label is active when the click is deleted
    widget.points_layer.selected_data = {0}
    widget.points_layer.remove_selected()
    wait(qtbot, widget)
    assert not (widget.labels_layer.data == 1).any()
    widget.propagate("both")  # nothing comes back
    wait(qtbot, widget)
    assert not (widget.labels_layer.data == 1).any()
    assert any("prompt" in e for e in notices["error"])


def test_undo_a_click_and_a_paint_stroke(make_napari_viewer, qtbot, model, notices):
    data = volume()
    viewer, layer, widget = start(make_napari_viewer, qtbot, model, data)
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    after_first = widget.labels_layer.data.copy()
    click(viewer, widget, 3, 30, 40)  # a second positive click
    wait(qtbot, widget)
    assert not np.array_equal(widget.labels_layer.data, after_first)
    widget.undo()  # Ctrl+Z
    wait(qtbot, widget)
    np.testing.assert_array_equal(widget.labels_layer.data, after_first)
    assert len(widget.points_layer.data) == 1
    # the engine is back too: propagating now equals a session with the first click only
    widget.propagate("forward")
    wait(qtbot, widget)
    ref = engine(model, data, tuple(layer.contrast_limits))
    ref.add_points(3, 1, points=[[20, 21]], labels=[1])
    for z, masks in ref.propagate("forward"):
        np.testing.assert_array_equal(widget.labels_layer.data[z] == 1, masks[1], err_msg=f"slice {z}")
    # a paint stroke, then undo: the labels are what they were, model pixels included
    before = widget.labels_layer.data.copy()
    lab = widget.labels_layer
    viewer.layers.selection.active = lab
    lab.selected_label = 2
    goto(viewer, 6)
    lab.paint((6, 30, 40), 2, refresh=True)
    qtbot.wait(100)  # the stroke becomes a prompt once napari has written it
    wait(qtbot, widget)
    assert (lab.data[6] == 2).sum() > 0
    widget.undo()
    wait(qtbot, widget)
    np.testing.assert_array_equal(lab.data, before)
    assert notices["error"] == []


def test_undo_key_is_bound(make_napari_viewer, qtbot, model, notices):
    _viewer, _layer, widget = start(make_napari_viewer, qtbot, model, volume())
    assert "Ctrl+Z" in {str(k) for k in widget.points_layer.keymap}


def test_start_again_does_not_reuse_old_clicks(make_napari_viewer, qtbot, model, notices):
    data = volume()
    viewer, layer, widget = start(make_napari_viewer, qtbot, model, data)
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    widget.start()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)
    assert len(widget.points_layer.data) == 0
    widget.new_object()
    click(viewer, widget, 3, 30, 40)
    wait(qtbot, widget)
    want = engine(model, data, tuple(layer.contrast_limits)).add_points(3, 2, points=[[40, 30]], labels=[1])[2]
    np.testing.assert_array_equal(widget.labels_layer.data[3] == 2, want & ~(widget.labels_layer.data[3] == 1))


# ---------------------------------------------------------------- 12. a model that cannot load


def test_failed_model_change_keeps_the_list_on_the_model_in_use(make_napari_viewer, qtbot, model, notices, tmp_path):
    _viewer, _layer, widget = start(make_napari_viewer, qtbot, model, volume())
    in_use = widget.model_choice
    widget.configure(checkpoint=tmp_path / "missing.pt")
    widget.start()
    wait(qtbot, widget)
    assert widget.model_choice == in_use
    assert "Still using" in widget.status
    assert any("does not exist" in e for e in notices["error"])


# ---------------------------------------------------------------- 14. objects too small for the model


def test_small_object_in_a_large_frame_is_warned_about(make_napari_viewer, qtbot, model, notices):
    rng = np.random.default_rng(0)
    img = rng.normal(1000, 30, (2, 1024, 1024)).astype(np.uint16)
    yy, xx = np.mgrid[0:1024, 0:1024]
    img[:, (yy - 500) ** 2 + (xx - 500) ** 2 < 25] += 2000  # a 10-pixel nucleus
    viewer, _layer, widget = start(make_napari_viewer, qtbot, model, img)
    goto(viewer, 0)
    box = np.array([[0, 495, 495], [0, 495, 505], [0, 505, 505], [0, 505, 495]], float)
    widget.shapes_layer.add(box, shape_type="rectangle")
    wait(qtbot, widget)
    assert any("shrunk 8.0 times" in w for w in notices["warning"])
    assert "shrunk" in widget.status
    # a large object in the same frame gives no warning
    notices["warning"].clear()
    widget.new_object()
    big = np.array([[1, 100, 100], [1, 100, 400], [1, 400, 400], [1, 400, 100]], float)
    goto(viewer, 1)
    widget.shapes_layer.add(big, shape_type="rectangle")
    wait(qtbot, widget)
    assert notices["warning"] == []


def test_a_click_for_another_object_keeps_a_box_and_its_object(make_napari_viewer, qtbot, model, notices):
    data = volume()
    viewer, layer, widget = start(make_napari_viewer, qtbot, model, data)
    goto(viewer, 3)
    box = np.array([[3, 10, 10], [3, 10, 30], [3, 28, 30], [3, 28, 10]], float)
    widget.shapes_layer.add(box, shape_type="rectangle")  # object 1: a box
    wait(qtbot, widget)
    assert (widget.labels_layer.data[3] == 1).any()
    widget.new_object()
    click(viewer, widget, 3, 30, 40)  # object 2: a click on the same slice
    wait(qtbot, widget)
    rng = tuple(layer.contrast_limits)
    ref = engine(model, data, rng)
    want1 = ref.add_points(3, 1, box=[10, 10, 30, 28])[1]
    want2 = ref.add_points(3, 2, points=[[40, 30]], labels=[1])[2]
    lab = widget.labels_layer.data[3]
    np.testing.assert_array_equal(lab == 1, want1)
    np.testing.assert_array_equal(lab == 2, want2 & ~want1)
    assert notices["error"] == []


def test_deleting_a_click_at_one_time_point_keeps_other_time_points(make_napari_viewer, qtbot, model, notices):
    data = volume(n=4)[None].repeat(2, axis=0)  # T Z Y X, propagated along Z: a session per time point
    viewer, _layer, widget = start(make_napari_viewer, qtbot, model, data,
                                   before_start=lambda v, w: w.configure(axis=1))
    for t in (0, 1):  # the same object id at two time points
        viewer.dims.current_step = (t, 2, 0, 0)
        widget.points_layer.add(np.array([[t, 2, 21, 20]], float))
        wait(qtbot, widget)
    assert (widget.labels_layer.data[0, 2] == 1).any() and (widget.labels_layer.data[1, 2] == 1).any()
    kept = widget.labels_layer.data[0].copy()
    widget.points_layer.selected_data = {1}  # the click at t = 1
    widget.points_layer.remove_selected()
    wait(qtbot, widget)
    assert not (widget.labels_layer.data[1] == 1).any()
    np.testing.assert_array_equal(widget.labels_layer.data[0], kept)


def test_slices_left_out_by_an_early_stop_lose_stale_labels(make_napari_viewer, qtbot, model, notices, monkeypatch):
    data = volume(n=12)
    viewer, _layer, widget = start(make_napari_viewer, qtbot, model, data)
    widget.configure(stop_after=0)
    click(viewer, widget, 2, 21, 20)
    wait(qtbot, widget)
    widget.propagate("forward")  # never stops: labels on slices 2..11
    wait(qtbot, widget)
    assert all((widget.labels_layer.data[z] == 1).any() for z in range(2, 12))
    session = widget.segmenter.session(viewer.dims.current_step)
    original = session.step

    def absent_from_6(frame, ids, reverse):  # the model now finds the object absent from slice 6 on
        low, scores = original(frame, ids, reverse)
        return low, scores if frame < 6 else scores * 0 - 5

    monkeypatch.setattr(session, "step", absent_from_6)
    widget.configure(stop_after=1)
    widget.propagate("forward")
    wait(qtbot, widget)
    assert widget.status == "Propagation finished."
    assert all((widget.labels_layer.data[z] == 1).any() for z in range(2, 6))
    assert not (widget.labels_layer.data[7:] == 1).any()  # left out, and the old labels are gone
