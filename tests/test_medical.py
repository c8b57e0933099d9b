"""NIfTI in and out, CT and MR windows (issue 18, medical I/O), checked against nibabel's own reading
and hand-computed windows."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_sam2.medical import ct_window, mr_window, read_nifti, write_nifti_labels
from napari_sam2.model import InputError


def make_volume(path, shape=(40, 30, 12), zooms=(0.8, 0.9, 2.5)):
    rng = np.random.default_rng(0)
    data = rng.normal(0, 50, shape).astype(np.int16)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    affine[0, 1] = 0.1  # an oblique affine: kept as it is
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return data, affine


def test_nifti_round_trip_keeps_data_spacing_and_affine(tmp_path):
    src = tmp_path / "ct.nii.gz"
    data, _affine = make_volume(src)
    vol = read_nifti(src)
    np.testing.assert_array_equal(vol.data, data.transpose(2, 1, 0))  # shown as Z-Y-X = (k, j, i)
    assert vol.spacing == pytest.approx((2.5, 0.9, 0.8)) and vol.unit == "mm"
    labels = np.zeros(vol.data.shape, np.uint16)
    labels[3:6, 10:20, 5:9] = 7
    out = write_nifti_labels(tmp_path / "labels.nii.gz", labels, reference=src)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, nib.load(str(src)).affine)
    assert back.header.get_zooms()[:3] == pytest.approx((0.8, 0.9, 2.5))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels.transpose(2, 1, 0))
    assert read_nifti(out).data.dtype == np.uint16
    with pytest.raises(FileExistsError):
        write_nifti_labels(out, labels, reference=src)
    with pytest.raises(InputError, match="shape"):
        write_nifti_labels(tmp_path / "x.nii", labels[:2], reference=src)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ct_and_mr_windows_by_hand():
    assert ct_window("soft tissue") == (-160.0, 240.0)  # level 40, width 400
    assert ct_window("Lung") == (-1350.0, 150.0)
    assert ct_window("bone") == (-500.0, 1300.0)
    assert ct_window("brain") == (0.0, 80.0)
    with pytest.raises(InputError, match="unknown CT window"):
        ct_window("liver")
    vol = np.zeros((4, 10, 10))
    vol[1:3] = np.arange(200).reshape(2, 10, 10) + 1  # values 1..200, the rest background 0
    lo, hi = mr_window(vol, (0, 100))
    assert (lo, hi) == (1.0, 200.0)


def test_cli_auto_reads_and_writes_nifti(tmp_path):
    from test_auto_stack import appearing_blob_stack

    from napari_sam2.cli import main

    image, _ = appearing_blob_stack(n=8, start=4, seed=40)
    voxels = image.transpose(2, 1, 0)  # (i, j, k) voxel order: slices along k
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(voxels, affine), str(tmp_path / "vol.nii.gz"))
    assert main(["auto", str(tmp_path / "vol.nii.gz"), "-o", str(tmp_path / "seg.nii.gz")]) == 0
    seg = nib.load(str(tmp_path / "seg.nii.gz"))
    np.testing.assert_allclose(seg.affine, affine)
    assert seg.shape == voxels.shape and len(np.unique(np.asanyarray(seg.dataobj))) == 3  # two objects
    assert main(["auto", str(tmp_path / "vol.nii.gz"), "-o", str(tmp_path / "w.nii.gz"), "--window", "bone"]) == 0


def test_napari_reader_and_writer_keep_the_geometry(tmp_path):
    """The plugin's NIfTI reader gives a Z-Y-X layer scaled by the voxel spacing, and its labels
    writer puts the volume's affine back (what napari calls for File > Open / Save Layers)."""
    import npe2

    src = tmp_path / "mr.nii.gz"
    data, _affine = make_volume(src)
    pm = npe2.PluginManager()
    pm.discover()
    pm.activate("napari-sam2")
    assert "napari-sam2.read_nifti" in {r.command for r in pm.iter_compatible_readers([str(src)])}
    from napari_sam2.medical import napari_get_reader, write_labels_layer

    ((vol, kwargs, kind),) = napari_get_reader(str(src))(str(src))
    assert kind == "image" and vol.shape == data.shape[::-1] and tuple(kwargs["scale"]) == pytest.approx((2.5, 0.9, 0.8))
    labels = (vol > 60).astype(np.uint16)
    (out,) = write_labels_layer(str(tmp_path / "l.nii.gz"), labels, {"metadata": kwargs["metadata"]})
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, nib.load(str(src)).affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels.transpose(2, 1, 0))
