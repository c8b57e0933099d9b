"""The npe2 manifest: valid, importable, and its contributions work."""

import shutil
import subprocess
import sys

import numpy as np
import pytest


def test_npe2_validate_with_imports():
    exe = shutil.which("npe2") or str((__import__("pathlib").Path(sys.executable).parent / "npe2"))
    out = subprocess.run([exe, "validate", "--imports", "napari-sam2"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_import_is_light():
    code = "import sys, napari_sam2; print('torch' in sys.modules, 'qtpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_sample_data_is_16_bit_with_labels():
    from napari_sam2.sample_data import (
        cells_2d_time,
        make_cells_2d_time,
        make_nuclei_3d,
        nuclei_3d,
    )

    img, lab = nuclei_3d(seed=3)
    assert img.dtype == np.uint16 and img.shape == lab.shape and len(np.unique(lab)) > 5
    # touching nuclei: some labels share a face
    z, y, x = np.nonzero(lab[:, :, 1:] != lab[:, :, :-1])
    pairs = {(a, b) for a, b in zip(lab[z, y, x], lab[z, y, x + 1]) if a and b}
    assert pairs
    img2, lab2 = cells_2d_time(seed=4)
    assert img2.dtype == np.uint16 and img2.ndim == 3 and lab2.max() >= 5
    for make in (make_nuclei_3d, make_cells_2d_time):
        ((data, meta, kind),) = make()
        assert kind == "image" and data.dtype == np.uint16 and "contrast_limits" in meta


def test_writer_contribution(tmp_path):
    import tifffile

    from napari_sam2.io import write_labels_layer

    data = np.zeros((3, 8, 9), np.int32)
    data[1, 2:4, 3:5] = 4
    (path,) = write_labels_layer(str(tmp_path / "l.tif"), data, {"scale": (3.0, 0.2, 0.2)})
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "ZYX" and tif.imagej_metadata["spacing"] == 3.0
        np.testing.assert_array_equal(tif.asarray(), data)


def test_cli_gui_parser():
    from napari_sam2.cli import build_parser

    args = build_parser().parse_args(["gui", "--model", "sam2.1_hiera_small"])
    assert args.command == "gui" and args.model == "sam2.1_hiera_small"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment"])


def test_touching_nuclei_are_dimmer_where_they_meet():
    """The seam: contact voxels (a face neighbour in another nucleus) are found exactly,
    they are dimmer with a seam, and nothing else changes."""
    from napari_sam2.sample_data import _contacts, nuclei_3d

    lab = np.zeros((1, 3, 7), int)
    lab[0, 1, 0:3] = 1
    lab[0, 1, 3:5] = 2
    lab[0, 0, 1] = 1
    lab[0, 2, 4] = 3
    expected = np.zeros_like(lab, bool)
    expected[0, 1, 2] = expected[0, 1, 3] = True  # 1 | 2 along x
    expected[0, 1, 4] = expected[0, 2, 4] = True  # 2 over 3 along y
    np.testing.assert_array_equal(_contacts(lab), expected)

    flat = {"brightness": (1.0, 1.0), "texture": 0.0, "noise": 0.0, "background": 0.0, "seed": 3}
    img0, lab0 = nuclei_3d(seam=0.0, **flat)
    img1, lab1 = nuclei_3d(seam=0.5, **flat)
    np.testing.assert_array_equal(lab0, lab1)
    contact = _contacts(lab1)
    assert contact.any() and not contact[lab1 == 0].any()
    assert img1[contact].mean() < 0.85 * img0[contact].mean()
    inner = (lab1 > 0) & ~contact
    from scipy import ndimage

    # beyond the reach of the optics blur (4 sigma = 5 slices), the two images are the same
    far = inner & ~ndimage.binary_dilation(contact, iterations=6)
    assert far.sum() > 1000
    np.testing.assert_allclose(img1[far].astype(int), img0[far].astype(int), atol=1)


def test_reader_contribution(tmp_path):
    """TIFF files open through the plugin's reader with their calibration."""
    import npe2
    import tifffile

    pm = npe2.PluginManager()
    pm.discover()
    pm.activate("napari-sam2")
    manifest = pm.get_manifest("napari-sam2")
    reader = next(r for r in manifest.contributions.readers if r.command == "napari-sam2.read_tiff")
    assert set(reader.filename_patterns) == {"*.tif", "*.tiff"} and not reader.accepts_directories
    command = next(c for c in manifest.contributions.commands if c.id == reader.command)
    assert command.python_name == "napari_sam2.io:napari_get_reader"

    path = tmp_path / "img.TIF"
    tifffile.imwrite(path, np.zeros((3, 8, 9), np.uint16), imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "spacing": 1.5, "unit": "um"})
    assert reader.command in {r.command for r in pm.iter_compatible_readers([str(path)])}
    # what napari does: napari_get_reader(path), then the function it returns
    read = reader.exec(kwargs={"path": [str(path)], "stack": False}, _registry=pm.commands)
    ((data, kwargs, kind),) = read([str(path)], stack=False)
    assert kind == "image" and data.shape == (3, 8, 9)
    assert tuple(kwargs["scale"]) == (1.5, 0.5, 0.5)
