"""A NIfTI volume in the dock widget (Xvfb): a CT window becomes the contrast the model sees,
and Save labels… with a .nii.gz name keeps the scan's affine (checked with nibabel)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from _stacks import click, drain_qt_workers  # noqa: F401 (drain_qt_workers: an autouse fixture)
from test_auto_stack import appearing_blob_stack

from napari_sam2.widgets import sam2_widget as sw

TIMEOUT = 60_000


def test_ct_window_and_nifti_labels(make_napari_viewer, qtbot, nano, tmp_path, errors):
    image, _truth = appearing_blob_stack(n=6, start=3, seed=5)
    hu = image.astype(np.int16) // 10 - 100  # HU-like values, about -60..300
    affine = np.diag([0.6, 0.6, 2.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 3.0]
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), affine), str(tmp_path / "ct.nii.gz"))
    viewer = make_napari_viewer()
    layer = viewer.open(str(tmp_path / "ct.nii.gz"), plugin="napari-sam2")[0]
    widget = sw.SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.configure(image=layer, loaded_model=nano, orientations=1)
    widget.apply_window("CT soft tissue")
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)  # level 40, width 400, by hand
    widget.start()
    qtbot.waitUntil(lambda: not widget.is_busy and widget.session_started, timeout=TIMEOUT)
    assert tuple(widget.segmenter.intensity_range) == (-160.0, 240.0)  # what the model sees
    click(viewer, widget, 2, 40, 38)
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT)
    labels = np.asarray(widget.labels_layer.data).copy()
    assert labels[2].any()
    out = widget.save_labels(tmp_path / "seg.nii.gz")
    assert not errors, errors
    seg = nib.load(str(out))
    np.testing.assert_allclose(seg.affine, affine)
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj).transpose(2, 1, 0), labels)
    assert (tmp_path / "seg.sam2.json").exists()
    with pytest.raises(FileExistsError):
        widget.save_labels(tmp_path / "seg.nii.gz")

    # resume from the session saved beside the NIfTI labels: its labels are read back from NIfTI
    viewer2 = make_napari_viewer()
    layer2 = viewer2.open(str(tmp_path / "ct.nii.gz"), plugin="napari-sam2")[0]
    widget2 = sw.SAM2Widget(viewer2)
    viewer2.window.add_dock_widget(widget2)
    widget2.configure(image=layer2, loaded_model=nano, orientations=1)
    widget2.resume(tmp_path / "seg.sam2.json")
    qtbot.waitUntil(lambda: not widget2.is_busy and widget2.session_started, timeout=TIMEOUT)
    assert not errors, errors
    np.testing.assert_array_equal(np.asarray(widget2.labels_layer.data), labels)
