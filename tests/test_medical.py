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


# ---------------------------------------------------------------------- MedSAM2


def test_a_medsam2_layout_checkpoint_loads_strictly(tmp_path):
    """A file laid out as MedSAM2's (Meta's trainer: {"model": state dict} beside the
    optimizer's state and the epoch), from random weights of SAM 2.1 tiny at 512 px."""
    import torch

    from napari_sam2.model import CheckpointError, build_model, get_config, load_model

    torch.manual_seed(0)
    made = build_model(get_config("sam2.1_hiera_tiny").with_image_size(512))
    with torch.no_grad():
        for p in made.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = made.state_dict()
    path = tmp_path / "MedSAM2_latest.pt"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 7}, path)
    model = load_model("medsam2", path)
    assert model.image_size == 512
    loaded = model.state_dict()
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    x = torch.rand(1, 3, 512, 512)
    with torch.no_grad():
        a, b = model.image_encoder(model.normalize(x)), made.image_encoder(made.normalize(x))
    assert torch.equal(a.fpn[-1], b.fpn[-1]) and a.fpn[-1].shape[-1] == 32  # 512 px / 16

    # a checkpoint with a module the model lacks (e.g. a research fork's boundary head) is refused
    torch.save({"model": {**sd, "boundary_head.conv1.weight": torch.zeros(4, 4, 3, 3)}}, tmp_path / "fork.pt")
    with pytest.raises(CheckpointError, match="medsam2"):
        load_model("medsam2", tmp_path / "fork.pt")


def test_largest_component_on_a_hand_made_volume():
    from napari_sam2.model.postprocess import largest_component

    vol = np.zeros((6, 10, 10), bool)
    vol[1:4, 1:4, 1:4] = True  # 27 voxels
    vol[4, 4, 4] = True  # touches the cube only by a corner: the same 26-connected part
    vol[0:6, 8, 8] = True  # 6 voxels apart
    want = np.zeros_like(vol)
    want[1:4, 1:4, 1:4] = True
    want[4, 4, 4] = True
    np.testing.assert_array_equal(largest_component(vol), want)
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_box_protocol_tracks_both_ways_and_keeps_the_largest_part():
    """With a random model whose object score says "present" on every slice, the protocol's
    result is the union of a forward run and a separate backward run from the box, worked
    out here with plain sessions, then its largest 3D part."""

    from _stacks import present_tiny_model

    from napari_sam2.medical import box_protocol
    from napari_sam2.model.postprocess import largest_component
    from napari_sam2.model.video import StackSession

    model = present_tiny_model(64, seed=1)
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 20, (7, 48, 48))
    vol[:, 14:30, 16:34] += 300  # a bright block through the volume (HU-like values)
    box = (14, 12, 36, 32)
    got = box_protocol(model, vol, box, 3, intensity_range=(-160, 240), largest_component=False)
    want = np.zeros(vol.shape, bool)
    for direction in ("forward", "backward"):
        s = StackSession(model, vol, intensity_range=(-160, 240))
        s.add_points(3, 1, box=box)
        for z, masks in s.propagate(direction):
            want[z] |= masks[1]
    assert want[3].any()
    np.testing.assert_array_equal(got, want)
    # both directions contribute: slices before and after the key slice hold the object
    assert got[:3].any(axis=(1, 2)).all() and got[4:].any(axis=(1, 2)).all()
    np.testing.assert_array_equal(box_protocol(model, vol, box, 3, intensity_range=(-160, 240)),
                                  largest_component(want))


def test_cli_box_writes_the_protocols_mask_with_the_source_geometry(tmp_path, capsys, nano):
    from test_auto_stack import appearing_blob_stack

    from napari_sam2.cli import main
    from napari_sam2.medical import box_protocol

    image, truth = appearing_blob_stack(n=8, start=4, seed=41)
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), str(tmp_path / "ct.nii.gz"))
    assert main(["box", str(tmp_path / "ct.nii.gz"), "--box", "26,26,54,54", "--slice", "4",
                 "-o", str(tmp_path / "mask.nii.gz")]) == 0
    assert "voxels on" in capsys.readouterr().out
    seg = nib.load(str(tmp_path / "mask.nii.gz"))
    np.testing.assert_allclose(seg.affine, affine)
    got = np.asanyarray(seg.dataobj).transpose(2, 1, 0) > 0  # back to Z-Y-X
    want = box_protocol(nano, read_nifti(tmp_path / "ct.nii.gz").data, (26, 26, 54, 54), 4)
    np.testing.assert_array_equal(got, want)
    inter = (got & (truth == 1)).sum()
    assert 2 * inter / (got.sum() + (truth == 1).sum()) > 0.7  # the blob the box was drawn on
    assert main(["box", str(tmp_path / "ct.nii.gz"), "--box", "26,26,54,54", "--slice", "40",
                 "-o", str(tmp_path / "m2.nii.gz")]) == 1
    assert "slice 40 is outside" in capsys.readouterr().err
