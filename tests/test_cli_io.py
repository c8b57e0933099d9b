"""Command line and label TIFF writing."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from napari_sam2.cli import main
from napari_sam2.io import write_labels
from napari_sam2.model import ImagePredictor, build_model, get_config


def test_write_labels_roundtrip_with_axes_and_spacing(tmp_path):
    labels = np.zeros((3, 4, 5, 6), np.int64)
    labels[1, 2, 3, 4] = 7
    f = write_labels(tmp_path / "l.tif", labels, axes="TZYX", spacing=(2.0, 0.5, 0.25, 0.25))
    with tifffile.TiffFile(f) as tif:
        data = tif.asarray()
        meta = tif.imagej_metadata
        xres = tif.pages[0].tags["XResolution"].value
    assert data.dtype == np.uint16 and np.array_equal(data, labels)
    assert meta["spacing"] == 0.5 and meta["finterval"] == 2.0 and meta["unit"] == "micron"
    assert xres[0] / xres[1] == pytest.approx(4.0)
    assert tifffile.TiffFile(f).series[0].axes == "TZYX"


def test_write_labels_uint32_when_needed_and_no_overwrite(tmp_path):
    labels = np.zeros((2, 3, 4), np.int64)
    labels[1, 2, 3] = 70000
    f = write_labels(tmp_path / "big.tif", labels, spacing=(2.0, 0.5, 0.5))
    with tifffile.TiffFile(f) as tif:
        assert tif.series[0].axes == "ZYX"
        data = tif.asarray()
        assert 'PhysicalSizeZ="2.0"' in tif.ome_metadata
    assert data.dtype == np.uint32 and np.array_equal(data, labels)
    with pytest.raises(FileExistsError):
        write_labels(f, labels)
    write_labels(f, labels * 0, overwrite=True)
    assert tifffile.imread(f).max() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["big.tif"]  # no temporary left behind


def test_cli_segment_matches_predictor(tmp_path):
    torch.manual_seed(0)
    cfg = get_config("sam2.1_hiera_tiny")
    model = build_model(cfg)
    ckpt = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    img = np.random.default_rng(0).integers(0, 4000, (64, 80)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "img.tif", img)
    out = tmp_path / "labels.tif"
    rc = main(["segment", str(tmp_path / "img.tif"), "--point", "30,20", "-o", str(out),
               "--checkpoint", str(ckpt), "--device", "cpu", "--range", "0", "4000"])
    assert rc == 0
    expected = ImagePredictor(model)
    expected.set_image(img, intensity_range=(0, 4000))
    r = expected.predict(points=[[30, 20]], labels=[1])
    assert np.array_equal(tifffile.imread(out), r.masks[int(np.argmax(r.iou))].astype(np.uint16))
    # refuses to overwrite, and explains bad checkpoints without a traceback
    assert main(["segment", str(tmp_path / "img.tif"), "--point", "30,20", "-o", str(out), "--checkpoint", str(ckpt)]) == 1
    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    assert main(["segment", str(tmp_path / "img.tif"), "--point", "1,1", "-o", str(tmp_path / "x.tif"), "--checkpoint", str(bad)]) == 1


def test_cli_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "sam2.1_hiera_large" in out and "dl.fbaipublicfiles.com" in out


def test_tiff_stack_reads_lazily(tmp_path):
    from napari_sam2.io import TiffStack
    from napari_sam2.model.frames import FrameSource

    data = np.random.default_rng(0).integers(0, 60000, (7, 20, 30)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", data)
    stack = TiffStack(tmp_path / "s.tif")
    assert stack.shape == data.shape and stack.dtype == np.uint16
    np.testing.assert_array_equal(stack[4], data[4])
    np.testing.assert_array_equal(stack[4, 2:5], data[4, 2:5])
    src = FrameSource(stack, intensity_range=(0, 60000))
    assert len(src) == 7 and src.shape == (20, 30)
    with pytest.raises(TypeError):
        stack[1:3]
