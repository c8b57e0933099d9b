"""Issue 15, items 2 and 3: the calibration and axes of an image survive reading and
saving labels; saved label files get normal permissions, a .tif name and clear errors."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import tifffile

from napari_sam2.io import (
    labels_write_kwargs,
    layer_kwargs,
    napari_get_reader,
    read_image_file,
    write_labels,
    write_labels_layer,
)


def _imagej_hyperstack(path, shape=(2, 3, 16, 20), axes="TZYX"):
    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.325, 1 / 0.325),
        metadata={"spacing": 2.0, "finterval": 60.0, "unit": "um", "axes": axes},
    )
    return data


def _layer_attributes(kwargs):
    """What napari hands a writer for a Labels layer made from the image's layer kwargs."""
    return {"scale": kwargs["scale"], "metadata": kwargs["metadata"], "name": "labels"}


def test_imagej_hyperstack_axes_and_calibration(tmp_path):
    data = _imagej_hyperstack(tmp_path / "img.tif")
    image = read_image_file(tmp_path / "img.tif")
    assert image.axes == "TZYX" and not image.rgb and image.channel_axis is None
    assert image.scale == pytest.approx((60.0, 2.0, 0.325, 0.325))
    assert image.units == ("s", "µm", "µm", "µm")
    assert image.name == "img"
    np.testing.assert_array_equal(image.data, data)

    kwargs = layer_kwargs(image)
    assert kwargs["scale"] == pytest.approx((60.0, 2.0, 0.325, 0.325))
    assert tuple(kwargs["axis_labels"]) == ("T", "Z", "Y", "X")
    assert kwargs["rgb"] is False and "channel_axis" not in kwargs
    assert kwargs["metadata"]["napari_sam2"]["axes"] == "TZYX"


def test_zcyx_file_keeps_its_channel_axis(tmp_path):
    _imagej_hyperstack(tmp_path / "zc.tif", shape=(5, 2, 16, 20), axes="ZCYX")
    image = read_image_file(tmp_path / "zc.tif")
    assert image.axes == "ZCYX" and image.channel_axis == 1 and image.data.shape == (5, 2, 16, 20)
    assert image.scale == pytest.approx((2.0, 1.0, 0.325, 0.325))

    kwargs = layer_kwargs(image)
    # napari splits the channels; everything per layer describes Z, Y, X
    assert kwargs["channel_axis"] == 1
    assert kwargs["scale"] == pytest.approx((2.0, 0.325, 0.325))
    assert [tuple(a) for a in kwargs["axis_labels"]] == [("Z", "Y", "X")] * 2
    assert [m["napari_sam2"]["axes"] for m in kwargs["metadata"]] == ["ZYX", "ZYX"]


def test_napari_splits_channels_with_their_scale(tmp_path):
    from napari.components import ViewerModel

    _imagej_hyperstack(tmp_path / "zc.tif", shape=(5, 2, 16, 20), axes="ZCYX")
    image = read_image_file(tmp_path / "zc.tif")
    viewer = ViewerModel()
    layers = viewer.add_image(image.data, **layer_kwargs(image))
    assert len(layers) == 2
    for layer in layers:
        assert layer.data.shape == (5, 16, 20)
        np.testing.assert_allclose(layer.scale, (2.0, 0.325, 0.325))
        assert tuple(layer.axis_labels) == ("Z", "Y", "X")


@pytest.mark.parametrize("imagej", [True, False])
def test_rgb_time_series(tmp_path, imagej):
    data = np.random.default_rng(0).integers(0, 255, (4, 16, 20, 3), dtype=np.uint8)
    if imagej:
        tifffile.imwrite(tmp_path / "rgb.tif", data, imagej=True, metadata={"axes": "TYXS", "finterval": 0.5})
    else:
        tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb")
    image = read_image_file(tmp_path / "rgb.tif")
    assert image.rgb and image.axes == "TYX" and image.channel_axis is None
    assert len(image.scale) == 3 and image.data.shape == (4, 16, 20, 3)
    if imagej:
        assert image.scale[0] == pytest.approx(0.5) and image.units[0] == "s"
    kwargs = layer_kwargs(image)
    assert kwargs["rgb"] is True and tuple(kwargs["axis_labels"]) == ("T", "Y", "X")


def test_plain_grey_stack_is_not_read_as_colour(tmp_path):
    # tifffile.imwrite marks a (3, Y, X) array as planar RGB; without other axis information it is a stack
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 16, 20), np.uint16))
    image = read_image_file(tmp_path / "s.tif")
    assert image.axes == "ZYX" and not image.rgb and image.channel_axis is None
    assert image.units == ("pixel", "pixel", "pixel") and not image.calibrated


def test_ome_units_are_converted_to_micrometres_and_seconds(tmp_path):
    tifffile.imwrite(
        tmp_path / "img.ome.tif",
        np.zeros((2, 3, 16, 20), np.uint16),
        metadata={
            "axes": "TZYX",
            "PhysicalSizeX": 325.0, "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 325.0, "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": 0.002, "PhysicalSizeZUnit": "mm",
            "TimeIncrement": 1.5, "TimeIncrementUnit": "min",
        },
    )
    image = read_image_file(tmp_path / "img.ome.tif")
    assert image.axes == "TZYX" and image.name == "img"
    assert image.scale == pytest.approx((90.0, 2.0, 0.325, 0.325))
    assert image.units == ("s", "µm", "µm", "µm")


@pytest.mark.parametrize("top", [7, 70000])  # ImageJ hyperstack, OME-TIFF (uint32)
def test_calibration_round_trip_through_saved_labels(tmp_path, top):
    _imagej_hyperstack(tmp_path / "img.tif")
    image = read_image_file(tmp_path / "img.tif")
    labels = np.zeros(image.data.shape, np.int32)
    labels[1, 2, 3:6, 4:8] = top
    save = labels_write_kwargs(_layer_attributes(layer_kwargs(image)), labels.ndim)
    assert save["axes"] == "TZYX"
    out = write_labels(tmp_path / "labels.tif", labels, **save)
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].axes == "TZYX"
        np.testing.assert_array_equal(tif.asarray(), labels)
        if top < 65536:
            meta = tif.imagej_metadata
            assert meta["spacing"] == pytest.approx(2.0) and meta["finterval"] == pytest.approx(60.0)
            assert meta["unit"] == "micron"
            num, den = tif.pages[0].tags["XResolution"].value
            assert den / num == pytest.approx(0.325, rel=1e-6)
        else:
            assert 'TimeIncrement="60.0"' in tif.ome_metadata and 'TimeIncrementUnit="s"' in tif.ome_metadata
    back = read_image_file(out)
    assert back.axes == "TZYX"
    assert back.scale == pytest.approx((60.0, 2.0, 0.325, 0.325), rel=1e-6)
    assert back.units == ("s", "µm", "µm", "µm")


def test_uncalibrated_image_gives_uncalibrated_labels(tmp_path):
    """No false 1 µm pixels and 1 s frames for a file that had no calibration."""
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((4, 16, 20), np.uint16), imagej=True, metadata={"axes": "TYX"})
    image = read_image_file(tmp_path / "img.tif")
    assert image.axes == "TYX" and image.units == ("pixel", "pixel", "pixel")
    labels = np.zeros((4, 16, 20), np.uint8)
    (out,) = write_labels_layer(str(tmp_path / "l.tif"), labels, _layer_attributes(layer_kwargs(image)))
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].axes == "TYX"
        assert "unit" not in tif.imagej_metadata and "finterval" not in tif.imagej_metadata


def test_napari_writer_takes_axes_from_layer_metadata(tmp_path):
    labels = np.zeros((4, 16, 20), np.int32)
    labels[2, 3:5, 4:6] = 3
    attributes = {
        "scale": (60.0, 0.325, 0.325),
        "metadata": {"napari_sam2": {"axes": "TYX", "units": ["s", "µm", "µm"]}},
    }
    (out,) = write_labels_layer(str(tmp_path / "l.tif"), labels, attributes)
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].axes == "TYX"  # not a guessed "ZYX"
        assert tif.imagej_metadata["finterval"] == pytest.approx(60.0)
        assert "spacing" not in tif.imagej_metadata


def test_saved_file_gets_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_labels(tmp_path / "l.tif", np.ones((8, 9), np.uint16))
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_name_without_extension_gets_tif(tmp_path):
    out = write_labels(tmp_path / "labels", np.ones((8, 9), np.uint16))
    assert out == tmp_path / "labels.tif" and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["labels.tif"]
    with pytest.raises(FileExistsError):
        write_labels(tmp_path / "labels", np.ones((8, 9), np.uint16))


def test_write_error_names_the_target_not_the_temporary_file(tmp_path, monkeypatch):
    def full_disk(file, *args, **kwargs):
        with open(file, "wb") as f:
            f.write(b"II*\0")
        raise OSError(28, "No space left on device", str(file))

    monkeypatch.setattr(tifffile, "imwrite", full_disk)
    target = tmp_path / "labels.tif"
    with pytest.raises(OSError) as err:
        write_labels(target, np.ones((8, 9), np.uint16))
    message = str(err.value)
    assert str(target) in message and "No space left on device" in message
    assert ".part" not in message
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_refuses_float_or_negative_labels(tmp_path):
    with pytest.raises(ValueError, match="integers"):
        write_labels(tmp_path / "f.tif", np.full((8, 9), 1.5, np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        write_labels(tmp_path / "n.tif", np.full((8, 9), -1, np.int32))
    assert list(tmp_path.iterdir()) == []
    write_labels(tmp_path / "b.tif", np.ones((8, 9), bool))  # a mask is fine


def test_napari_reader_gives_calibrated_layers(tmp_path):
    _imagej_hyperstack(tmp_path / "img.tif")
    assert napari_get_reader(str(tmp_path / "img.png")) is None
    reader = napari_get_reader(str(tmp_path / "img.tif"))
    assert callable(reader)
    ((data, kwargs, kind),) = reader(str(tmp_path / "img.tif"))
    assert kind == "image" and data.shape == (2, 3, 16, 20)
    assert kwargs["scale"] == pytest.approx((60.0, 2.0, 0.325, 0.325))
    assert kwargs["metadata"]["napari_sam2"]["axes"] == "TZYX"


def test_axes_out_of_order_are_saved_in_imagej_order(tmp_path):
    labels = np.zeros((3, 2, 8, 9), np.int32)
    labels[1, 0, 2, 3] = 5
    out = write_labels(tmp_path / "l.tif", labels, axes="ZTYX", spacing=(2.0, 30.0, 0.5, 0.5))
    back = read_image_file(out)
    assert back.axes == "TZYX" and back.scale == pytest.approx((30.0, 2.0, 0.5, 0.5))
    np.testing.assert_array_equal(back.data, labels.transpose(1, 0, 2, 3))
