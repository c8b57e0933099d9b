"""Command-line mistakes end with one ``error: ...`` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

import napari_sam2
from napari_sam2 import cli
from napari_sam2.cli import main


def _fails(capsys, argv) -> str:
    """Run the CLI, check it failed with exactly one 'error:' line on stderr; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture()
def files(tmp_path):
    """A 2D image, a text file, a 1D TIFF, a (fake) NIfTI volume and a mismatched stack pair."""
    f = {
        "img": tmp_path / "img.tif",
        "notes": tmp_path / "notes.txt",
        "line": tmp_path / "line.tif",
        "nifti": tmp_path / "volume.nii.gz",
        "stack": tmp_path / "stack.tif",
        "labels": tmp_path / "labels.tif",
    }
    tifffile.imwrite(f["img"], np.random.default_rng(0).integers(0, 4000, (40, 50)).astype(np.uint16))
    f["notes"].write_text("my notes about the experiment\n")
    tifffile.imwrite(f["line"], np.arange(50, dtype=np.uint16))
    f["nifti"].write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))  # gzip magic, as a .nii.gz starts
    tifffile.imwrite(f["stack"], np.zeros((4, 32, 32), np.uint16))
    labels = np.zeros((3, 32, 32), np.uint16)
    labels[1, 10:20, 10:20] = 1
    tifffile.imwrite(f["labels"], labels)
    return f


@pytest.fixture()
def no_viewer(monkeypatch):
    """Fail the test if the gui command gets as far as opening a viewer."""

    def open_gui(*args, **kwargs):
        raise AssertionError("open_gui was called for input that should have been refused")

    monkeypatch.setattr(cli, "open_gui", open_gui)


# ---------------------------------------------------------------- segment


def test_segment_unknown_model_lists_known_names(capsys, files, tmp_path):
    line = _fails(capsys, ["segment", str(files["img"]), "--point", "3,3", "-o", str(tmp_path / "o.tif"),
                           "--model", "nosuch"])
    assert "nosuch" in line and "sam2.1_hiera_tiny" in line and "sam2.1_nano_synthetic" in line


def test_segment_cuda_without_cuda(capsys, files, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _fails(capsys, ["segment", str(files["img"]), "--point", "3,3", "-o", str(tmp_path / "o.tif"),
                           "--device", "cuda"])
    assert "CUDA is not available on this machine" in line and "--device cpu" in line


def test_segment_unknown_device(capsys, files, tmp_path):
    line = _fails(capsys, ["segment", str(files["img"]), "--point", "3,3", "-o", str(tmp_path / "o.tif"),
                           "--device", "gpu"])
    assert "'gpu'" in line and "cpu" in line


def test_segment_text_file_as_image(capsys, files, tmp_path):
    line = _fails(capsys, ["segment", str(files["notes"]), "--point", "3,3", "-o", str(tmp_path / "o.tif")])
    assert "cannot read image file" in line and "notes.txt" in line and "TIFF" in line


def test_segment_1d_tiff(capsys, files, tmp_path):
    line = _fails(capsys, ["segment", str(files["line"]), "--point", "3,3", "-o", str(tmp_path / "o.tif")])
    assert "1D" in line and "at least 2 dimensions" in line


def test_segment_unwritable_output(capsys, files, tmp_path, bundled_nano):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = _fails(capsys, ["segment", str(files["img"]), "--point", "3,3", "-o", str(blocker / "o.tif")])
    assert "cannot write" in line and "--output" in line


def test_negative_click_is_parsed_and_reported_as_outside(capsys, files, tmp_path, bundled_nano):
    """argparse alone reads '-5,10' as an option ('expected one argument')."""
    out = tmp_path / "o.tif"
    line = _fails(capsys, ["segment", str(files["img"]), "--point", "-5,10", "-o", str(out)])
    assert "x=-5" in line and "outside the image" in line
    # a negative value that is still on the image (pixel edges lie at -0.5) is used
    assert main(["segment", str(files["img"]), "--point", "-0.4,10", "--negative", "-0.2,30",
                 "--box", "-0.5,-0.5,20,20", "-o", str(out)]) == 0
    assert tifffile.imread(out).shape == (40, 50)


# ---------------------------------------------------------------- gui (checked before any viewer)


def test_gui_text_file(capsys, files, no_viewer):
    line = _fails(capsys, ["gui", str(files["notes"])])
    assert "cannot read image file" in line and "notes.txt" in line


def test_gui_damaged_nifti_is_refused_before_a_window(capsys, files, no_viewer):
    line = _fails(capsys, ["gui", str(files["nifti"])])
    assert "cannot read the NIfTI file" in line and "volume.nii.gz" in line


def test_gui_1d_file(capsys, files, no_viewer):
    line = _fails(capsys, ["gui", str(files["line"])])
    assert "1D" in line and "(50,)" in line


def test_gui_missing_file(capsys, tmp_path, no_viewer):
    line = _fails(capsys, ["gui", str(tmp_path / "nope.tif")])
    assert "does not exist" in line


def test_gui_unknown_model(capsys, no_viewer):
    line = _fails(capsys, ["gui", "--model", "nosuch"])
    assert "nosuch" in line and "sam2.1_hiera_small" in line


def test_gui_good_file_reaches_the_viewer(files, monkeypatch):
    import napari

    opened = []
    monkeypatch.setattr(cli, "open_gui", lambda image, **kw: opened.append((image, kw)))
    monkeypatch.setattr(napari, "run", lambda *a, **k: None)
    assert main(["gui", str(files["stack"]), "--model", "sam2.1_hiera_tiny"]) == 0
    assert opened and opened[0][0] == files["stack"] and opened[0][1]["model"] == "sam2.1_hiera_tiny"


# ---------------------------------------------------------------- evaluate


def test_evaluate_mismatched_pair(capsys, files):
    line = _fails(capsys, ["evaluate", "--pair", str(files["stack"]), str(files["labels"]), "--device", "cpu"])
    assert "(3, 32, 32)" in line and "(4, 32, 32)" in line and "labels.tif" in line


def test_evaluate_pair_has_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--pair IMAGE LABELS" in out and "label stack" in out


# ---------------------------------------------------------------- --version


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"napari-sam2 {napari_sam2.__version__}"


def test_evaluate_stop_after_must_be_positive(capsys):
    line = _fails(capsys, ["evaluate", "--synthetic-seeds", "9000", "--stop-after", "0", "--device", "cpu"])
    assert "--stop-after must be 1 or more" in line


def test_errors_share_one_base_the_command_line_catches():
    from napari_sam2.model import (
        CheckpointError,
        InputError,
        NapariSAM2Error,
        TrainingError,
    )

    for kind in (CheckpointError, InputError, TrainingError):
        assert issubclass(kind, NapariSAM2Error)
    # the built-in bases they had stay, so callers' except clauses still catch them
    assert issubclass(InputError, ValueError) and issubclass(CheckpointError, RuntimeError)
    assert issubclass(TrainingError, RuntimeError)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    import torch

    from napari_sam2.files import atomic_write, atomic_write_text
    from napari_sam2.model.checkpoint import atomic_save

    target = atomic_write_text(tmp_path / "record.json", "old")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"could not write the record to .*record\.json: No space left") as err:
        atomic_write(target, half_then_fail, what="the record")
    assert err.value.errno == 28
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
    atomic_save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    assert torch.equal(torch.load(tmp_path / "weights.pt")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json", "weights.pt"]
