"""The dock widget with a real viewer (Xvfb), a tiny random-weight model and real thread workers.

Every expectation is computed independently with the engine's own session API
on the same image and prompts.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from _stacks import (  # noqa: F401 (drain_qt_workers: an autouse fixture)
    click,
    drain_qt_workers,
    paint_by_hand,
    two_blob_volume,
)

from napari_sam2.model.ensemble import open_session
from napari_sam2.model.frames import FrameSource
from napari_sam2.widgets import sam2_widget as sw

SIZE = 128
TIMEOUT = 60_000


volume = two_blob_volume



def make(viewer_factory, qtbot, model, data, *, before_start=None, expect_session=True, orientations=1, **layer_kwargs):
    """A viewer with ``data``, the docked widget, and a started session.

    before_start(viewer, widget) adjusts the viewer or the widget's choices first;
    orientations: the widget's Orientations choice (1: plain SAM 2, as ``engine``).
    """
    viewer = viewer_factory()
    layer = viewer.add_image(data, **layer_kwargs)
    widget = sw.SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.configure(image=layer, loaded_model=model, orientations=orientations)
    if before_start is not None:
        before_start(viewer, widget)
    widget.start()
    qtbot.waitUntil(lambda: not widget.is_busy and (widget.session_started or not expect_session), timeout=TIMEOUT)
    return viewer, layer, widget


def wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)


def engine(model, layer, orientations=1, **kw):
    """An independent session on the same data and intensity mapping."""
    frames = FrameSource(np.asarray(layer.data), tuple(layer.contrast_limits))
    return open_session(model, frames, orientations=orientations, corrections_as_conditioning=True, **kw)



def test_click_paints_the_engines_mask(make_napari_viewer, qtbot, model, errors):
    viewer, layer, widget = make(make_napari_viewer, qtbot, model, volume())
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    expected = engine(model, layer).add_points(3, 1, points=[[20, 21]], labels=[1])[1]
    assert expected.any()
    np.testing.assert_array_equal(widget.labels_layer.data[3], expected.astype(np.uint16))
    assert not widget.labels_layer.data[[0, 1, 2, 4, 5, 6, 7]].any()
    assert errors == []


def test_propagation_and_two_objects_match_the_engine(make_napari_viewer, qtbot, model, errors):
    viewer, layer, widget = make(make_napari_viewer, qtbot, model, volume())
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    assert widget.new_object() == 2
    click(viewer, widget, 3, 30, 43)
    wait(qtbot, widget)
    widget.propagate("both")
    wait(qtbot, widget)
    ref = engine(model, layer)
    expected = np.zeros(layer.data.shape, np.uint16)
    index = (3, slice(None), slice(None))
    paint_by_hand(expected, index, {1: ref.add_points(3, 1, points=[[20, 21]], labels=[1])[1]})
    paint_by_hand(expected, index, {2: ref.add_points(3, 2, points=[[43, 30]], labels=[1])[2]})
    for z, masks in ref.propagate("both"):
        paint_by_hand(expected, (z, slice(None), slice(None)), masks)
    np.testing.assert_array_equal(widget.labels_layer.data, expected)
    assert set(np.unique(widget.labels_layer.data)) == {0, 1, 2}
    assert errors == []


def test_orientations_choice_tracks_like_the_ensemble(make_napari_viewer, qtbot, model, errors):
    """With Orientations 4 a click and a propagation give what an EnsembleSession of four
    orientations gives on the same data."""
    viewer, layer, widget = make(make_napari_viewer, qtbot, model, volume(), orientations=4)
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    widget.propagate("forward")
    wait(qtbot, widget)
    ref = engine(model, layer, orientations=4)
    expected = np.zeros(layer.data.shape, np.uint16)
    paint_by_hand(expected, (3, slice(None), slice(None)), {1: ref.add_points(3, 1, points=[[20, 21]], labels=[1])[1]})
    for z, masks in ref.propagate("forward"):
        paint_by_hand(expected, (z, slice(None), slice(None)), masks)
    assert expected[4:].any()
    np.testing.assert_array_equal(widget.labels_layer.data, expected)
    plain = engine(model, layer).add_points(3, 1, points=[[20, 21]], labels=[1])[1]
    assert (plain != expected[3].astype(bool)).any()  # four orientations are not the plain result
    assert errors == []


def test_correction_then_propagation_matches_the_engine(make_napari_viewer, qtbot, model, errors):
    viewer, layer, widget = make(make_napari_viewer, qtbot, model, volume())
    click(viewer, widget, 2, 20, 20)
    wait(qtbot, widget)
    widget.propagate("forward")
    wait(qtbot, widget)
    widget.toggle_polarity()  # negative click on slice 5
    click(viewer, widget, 5, 40, 50)
    wait(qtbot, widget)
    widget.propagate("forward")
    wait(qtbot, widget)
    ref = engine(model, layer)
    ref.add_points(2, 1, points=[[20, 20]], labels=[1])
    list(ref.propagate("forward"))
    ref.add_points(5, 1, points=[[50, 40]], labels=[0])
    got = {z: m[1] for z, m in ref.propagate("forward")}
    for z in range(2, 8):
        np.testing.assert_array_equal(widget.labels_layer.data[z] == 1, got[z], err_msg=f"slice {z}")
    assert not widget.points_layer.features["positive"].iloc[-1]
    assert errors == []


def forward_run_until(make_napari_viewer, qtbot, model, z):
    """A 30-slice stack clicked on slice 0, propagating forward, with slice ``z`` written."""
    viewer, layer, widget = make(make_napari_viewer, qtbot, model, volume(n=30))
    click(viewer, widget, 0, 18, 20)
    wait(qtbot, widget)
    widget.propagate("forward")
    qtbot.waitUntil(lambda: widget.labels_layer.data[z].any(), timeout=TIMEOUT)
    return viewer, layer, widget


def test_cancel_keeps_done_slices_and_viewer_usable(make_napari_viewer, qtbot, model, errors):
    viewer, layer, widget = forward_run_until(make_napari_viewer, qtbot, model, 3)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)
    done = [z for z in range(30) if widget.labels_layer.data[z].any()]
    assert 3 in done and len(done) < 30
    ref = engine(model, layer)
    ref.add_points(0, 1, points=[[20, 18]], labels=[1])
    for z, masks in ref.propagate("forward"):
        if z > max(done):
            break
        np.testing.assert_array_equal(widget.labels_layer.data[z] == 1, masks[1])
    assert "cancelled" in widget.status
    # still usable: another click segments at once
    widget.new_object()
    click(viewer, widget, 10, 30, 40)
    wait(qtbot, widget)
    assert (widget.labels_layer.data[10] == 2).any()
    assert errors == []


def test_sixteen_bit_contrast_limits_reach_the_model(make_napari_viewer, qtbot, model, errors):
    data = volume()
    _viewer, _layer, widget = make(make_napari_viewer, qtbot, model, data, contrast_limits=(1100, 1600))
    session = widget.segmenter.session(widget.position)
    assert session.frames.intensity_range == (1100.0, 1600.0)
    x = session.frames.model_input(4, SIZE)
    manual = np.clip((data[4].astype(np.float32) - 1100) / 500, 0, 1)
    ref = torch.nn.functional.interpolate(torch.from_numpy(manual)[None, None], size=(SIZE, SIZE),
                                          mode="bilinear", align_corners=False, antialias=True)
    np.testing.assert_allclose(x[0, 0].numpy(), ref[0, 0].numpy(), atol=1e-6)


def test_save_labels_roundtrip(make_napari_viewer, qtbot, model, tmp_path, errors):
    viewer, _layer, widget = make(make_napari_viewer, qtbot, model, volume(), scale=(2.0, 0.5, 0.5))
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    path = widget.save_labels(tmp_path / "labels.tif")
    with tifffile.TiffFile(path) as tif:
        data = tif.asarray()
        assert tif.series[0].axes == "ZYX"
        assert tif.imagej_metadata["spacing"] == 2.0
        xres = tif.pages[0].tags["XResolution"].value
    assert data.dtype == np.uint16
    np.testing.assert_array_equal(data, widget.labels_layer.data)
    assert xres[0] / xres[1] == pytest.approx(2.0)  # 0.5 um pixels
    with pytest.raises(FileExistsError):
        widget.save_labels(tmp_path / "labels.tif")


@pytest.mark.parametrize(
    "shape,rgb,axis",
    [((40, 50), False, None), ((6, 40, 50), False, 0), ((5, 3, 40, 50), False, 0), ((40, 50, 3), True, None)],
    ids=["2D", "3D-or-T", "4D-TZYX", "RGB"],
)
def test_widget_on_2d_3d_4d_and_rgb(make_napari_viewer, qtbot, model, errors, shape, rgb, axis):
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 255).astype(np.uint8)
    viewer, layer, widget = make(make_napari_viewer, qtbot, model, data, rgb=rgb)
    assert widget.segmenter.axis == axis
    nd = layer.ndim
    coord = list(viewer.dims.current_step[-nd:])
    coord[-2:] = [20, 25]
    widget.points_layer.add(np.array([coord], float))
    wait(qtbot, widget)
    assert widget.labels_layer.data.shape == (shape[:-1] if rgb else shape)
    assert (widget.labels_layer.data == 1).any()
    assert errors == []


def test_bad_input_gives_notifications(make_napari_viewer, qtbot, model, errors, tmp_path):
    # 2D image with "propagate"
    viewer, _layer, widget = make(make_napari_viewer, qtbot, model, (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8))
    widget.points_layer.add(np.array([[20, 25]], float))
    wait(qtbot, widget)
    widget.propagate("both")
    assert any("2D" in e for e in errors)
    errors.clear()
    # a missing checkpoint
    widget.configure(checkpoint=tmp_path / "missing.pt")  # another choice: the loaded model is not reused
    widget.start()
    wait(qtbot, widget)
    assert any("does not exist" in e for e in errors)
    errors.clear()
    # propagate before any session
    fresh = sw.SAM2Widget(viewer)
    fresh.propagate("forward")
    assert any("start a session" in e for e in errors)


def test_image_removed_mid_run(make_napari_viewer, qtbot, model, errors):
    viewer, layer, widget = forward_run_until(make_napari_viewer, qtbot, model, 1)
    viewer.layers.remove(layer)
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)
    assert not widget.session_started
    assert widget.labels_layer.data[1].any()  # results so far kept
    widget.propagate("forward")  # asks for a session, no traceback
    assert any("start a session" in e for e in errors)


def test_empty_stack_is_refused(model):
    # napari cannot hold an empty image layer, so an empty stack can only reach
    # the controller from Python; it is refused there with a plain message
    from napari_sam2.model import InputError
    from napari_sam2.segmenter import StackSegmenter

    with pytest.raises(InputError, match="empty"):
        StackSegmenter(model, np.zeros((0, 20, 20), np.uint16), axis=0, displayed=(1, 2))


def test_start_in_3d_view_asks_for_2d(make_napari_viewer, qtbot, model, errors):
    def view_3d(viewer, widget):
        viewer.dims.ndisplay = 3

    _viewer, _layer, widget = make(make_napari_viewer, qtbot, model, volume(), before_start=view_3d, expect_session=False)
    assert not widget.session_started
    assert any("2D view" in e for e in errors)


def test_keyboard_shortcuts_are_bound(make_napari_viewer, qtbot, model, errors):
    _viewer, _layer, widget = make(make_napari_viewer, qtbot, model, volume())
    keys = widget.points_layer.keymap
    assert {"N", "T", "Shift+F", "Shift+B", "Shift+A", "Escape"} <= {str(k) for k in keys}
    from app_model.types import KeyBinding

    keys[KeyBinding.from_str("T")](widget.points_layer)
    assert widget.positive is False
    assert widget.points_layer.feature_defaults["positive"].iloc[0] == False


def test_writes_into_an_existing_labels_layer(make_napari_viewer, qtbot, model, errors):
    data = volume()
    existing = np.zeros(data.shape, np.uint16)
    existing[0, :5, :5] = 7  # earlier work must survive
    layers = {}

    def choose_mine(viewer, widget):
        layers["mine"] = viewer.add_labels(existing.copy(), name="my labels")
        widget.configure(output=layers["mine"])

    viewer, layer, widget = make(make_napari_viewer, qtbot, model, data, before_start=choose_mine)
    mine = layers["mine"]
    assert widget.labels_layer is mine
    assert widget.new_object() == 8
    click(viewer, widget, 3, 21, 20)
    wait(qtbot, widget)
    expected = engine(model, layer).add_points(3, 8, points=[[20, 21]], labels=[1])[8]
    np.testing.assert_array_equal(mine.data[3] == 8, expected)
    assert (mine.data[0, :5, :5] == 7).all()
    assert len([lay for lay in viewer.layers if lay.__class__.__name__ == "Labels"]) == 1


def test_gui_starts_a_bundled_model_at_once(make_napari_viewer, qtbot, errors, bundled_nano):
    """`napari-sam2 gui` with a model that ships with the package: sample nuclei, the
    widget, the session started without pressing Start; a click segments."""
    from napari_sam2.cli import open_gui
    from napari_sam2.model.config import NANO

    viewer, widget = open_gui(model=NANO.name, viewer=make_napari_viewer())
    qtbot.waitUntil(lambda: not widget.is_busy and widget.session_started, timeout=TIMEOUT)
    model, layer = widget.model, viewer.layers[0]
    assert model.config.name == NANO.name and layer.data.shape == (32, 192, 192)
    loaded = model.state_dict()
    for k, v in bundled_nano[0].state_dict().items():  # the bundled (float16) file was loaded
        assert torch.equal(loaded[k], v.half().float()), k
    with torch.no_grad():  # random weights: make the object score say "present"
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(8.0)
    assert widget.orientations == 8  # the nano model's default: eight orientations
    click(viewer, widget, 16, 96, 90)
    wait(qtbot, widget)
    expected = engine(model, layer, orientations=8).add_points(16, 1, points=[[90, 96]], labels=[1])[1]
    assert expected.any()
    np.testing.assert_array_equal(widget.labels_layer.data[16], expected.astype(np.uint16))
    assert errors == []


def test_gui_leaves_a_downloadable_model_to_start(make_napari_viewer, qtbot, errors):
    """A model that must be downloaded is not fetched on opening: Start does that."""
    from napari_sam2.cli import open_gui

    _, widget = open_gui(model="sam2.1_hiera_small", viewer=make_napari_viewer())
    qtbot.wait(50)
    assert widget.model_choice == "sam2.1_hiera_small"
    assert widget.orientations == 1  # Meta's models: plain SAM 2 unless asked
    _, widget = open_gui(model="sam2.1_hiera_small", orientations=4, viewer=make_napari_viewer())
    assert widget.orientations == 4
    assert not widget.is_busy and not widget.session_started and widget.model is None
    assert errors == []


def test_readme_gui_opens_ready_for_a_click_with_the_shipped_model(make_napari_viewer, qtbot, errors):
    """The README's first command, `napari-sam2 gui` with no arguments: the shipped nano
    weights start at once, and one click in the middle of a sample nucleus segments that
    nucleus (checked against the generator's labels, not against the engine)."""
    from napari_sam2.cli import open_gui
    from napari_sam2.model.config import NANO
    from napari_sam2.model.evaluate import central_pixel, dice
    from napari_sam2.sample_data import nuclei_3d

    viewer, widget = open_gui(viewer=make_napari_viewer())
    qtbot.waitUntil(lambda: not widget.is_busy and widget.session_started, timeout=TIMEOUT)
    assert widget.model.config.name == NANO.name
    _, labels = nuclei_3d()  # the sample data the viewer opened
    target = labels[16] == 7  # a nucleus in the middle of the stack
    x, y = central_pixel(target)
    click(viewer, widget, 16, y, x)
    wait(qtbot, widget)
    got = widget.labels_layer.data[16] == 1
    assert dice(got, target) > 0.8, dice(got, target)
    assert errors == []
