"""Medical volumes: NIfTI in and out, CT and MR intensity windows.

NIfTI is read and written with nibabel, the reference implementation of the format that
the neuroimaging and medical-imaging tools share (it handles ``.nii`` and ``.nii.gz``, the
affine, the qform / sform and the header's units, which a reader of our own would have to
get right case by case). A volume's voxel axes (i, j, k) are shown in napari as (k, j, i),
i.e. slices along k as Z-Y-X; labels are written back in the source's voxel order with
its affine and header geometry, so they overlay the image in any other tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .files import atomic_write
from .model.preprocess import InputError, percentile_range

__all__ = ["CT_WINDOWS", "NiftiVolume", "box_protocol", "ct_window", "is_nifti", "mr_window", "napari_get_reader",
           "read_nifti", "write_labels_layer", "write_nifti_labels"]

#: CT windows as (level, width) in Hounsfield units; the model sees level ± width / 2 as black..white
CT_WINDOWS = {
    "soft tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


def is_nifti(path: Union[str, Path]) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def ct_window(name: str) -> Tuple[float, float]:
    """The (low, high) Hounsfield range of a CT window preset (see :data:`CT_WINDOWS`)."""
    key = name.strip().lower()
    if key not in CT_WINDOWS:
        raise InputError(f"unknown CT window {name!r}; choose one of {', '.join(CT_WINDOWS)}")
    level, width = CT_WINDOWS[key]
    return level - width / 2, level + width / 2


def mr_window(volume, percentiles: Sequence[float] = (0.5, 99.5)) -> Tuple[float, float]:
    """An MR window: the given percentiles of the volume's finite, nonzero voxels (MR values
    have no fixed scale, and the background outside the body is zero)."""
    v = np.asarray(volume, dtype=np.float64)
    return percentile_range(v[np.isfinite(v) & (v != 0)], percentiles,
                            "the volume holds no nonzero finite voxel to take an MR window from")


@dataclass
class NiftiVolume:
    """A NIfTI volume as napari shows it: ``data`` (Z, Y, X) = voxel axes (k, j, i), ``spacing``
    (Z, Y, X) in the header's length unit (usually mm), and what writing labels back needs."""

    data: np.ndarray
    spacing: Tuple[float, float, float]
    unit: str
    affine: np.ndarray
    header: object
    path: Path


def box_protocol(model, volume, box: Sequence[float], key_slice: int, *,
                 intensity_range: Optional[Sequence[float]] = None, largest_component: bool = True,
                 fast: bool = False, progress=None) -> np.ndarray:
    """MedSAM2's protocol for one lesion or organ: a box on the key slice, tracked forward
    from it and, in a second session holding only the box, backward from it; the union of
    both, then the largest 3D connected part (26-connectivity). Returns a Z x Y x X bool mask.

    volume: Z x Y x X (slices along the first axis); box: (x0, y0, x1, y1) pixels of the key
    slice; intensity_range: the window (e.g. :func:`ct_window`; default the volume's
    percentiles). Use it with the ``medsam2`` model (512 px SAM 2.1 tiny, MedSAM2's
    weights), or any other. progress(slices done, slices) as slices come.
    """
    from .model.frames import FrameSource
    from .model.postprocess import largest_component as keep_largest
    from .model.video import StackSession, check_frame

    frames = FrameSource.for_model(model, volume, intensity_range)
    key = check_frame(key_slice, frames.num_frames)
    out = np.zeros((frames.num_frames, *frames.shape), bool)
    done = 0
    for direction in ("forward", "backward"):
        session = StackSession(model, frames, fast=fast)
        session.add_points(key, 1, box=box)
        for z, masks in session.propagate(direction):
            out[z] |= masks[1]
            done += 1
            if progress is not None:
                progress(done, frames.num_frames + 1)
    return keep_largest(out) if largest_component else out


def read_nifti(path: Union[str, Path]) -> NiftiVolume:
    """Read a 3D NIfTI volume (a 4D one with a single volume is taken as 3D)."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises several kinds for damaged files
        raise InputError(f"cannot read the NIfTI file {path}: {err}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path} holds a {data.ndim}D NIfTI image of shape {data.shape}; a 3D volume is needed")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    unit = img.header.get_xyzt_units()[0] or "unknown"
    return NiftiVolume(np.ascontiguousarray(data.transpose(2, 1, 0)), tuple(zooms[::-1]), unit,
                       np.asarray(img.affine), img.header, path)


def write_nifti_labels(path: Union[str, Path], labels, *, reference: Optional[Union[str, Path, NiftiVolume]] = None,
                       overwrite: bool = False) -> Path:
    """Write (Z, Y, X) labels as NIfTI in the reference volume's voxel order, with its affine
    and header geometry (no reference: identity affine). Written to a temporary file in the
    same folder, then renamed."""
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise InputError(f"{path}: a NIfTI file name ends in .nii or .nii.gz")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"NIfTI labels must be a 3D volume (Z, Y, X), got shape {labels.shape}")
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    voxels = np.ascontiguousarray(labels.astype(dtype).transpose(2, 1, 0))
    if reference is not None:
        ref = reference if isinstance(reference, NiftiVolume) else read_nifti(reference)
        if ref.data.shape != labels.shape:
            raise InputError(f"the labels have shape {labels.shape}, the reference volume {ref.data.shape}")
        header = ref.header.copy()
        header.set_data_dtype(dtype)
        img = nib.Nifti1Image(voxels, ref.affine, header)
        img.header.set_slope_inter(1, 0)
    else:
        img = nib.Nifti1Image(voxels, np.eye(4))
    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"  # nibabel picks the format by name
    return atomic_write(path, lambda tmp: nib.save(img, tmp), what="the labels", suffix=suffix)


# ---------------------------------------------------------------------- napari contributions


def _read_layers(paths) -> list:
    from .io import stem_of

    layers = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        vol = read_nifti(p)
        lo, hi = mr_window(vol.data) if np.any(vol.data) else (0.0, 1.0)
        layers.append((vol.data, {
            "name": stem_of(p), "scale": vol.spacing, "contrast_limits": (lo, hi),
            "metadata": {"napari_sam2": {"axes": "ZYX", "nifti_source": str(Path(p).resolve())}},
        }, "image"))
    return layers


def napari_get_reader(path):
    """napari reader contribution: NIfTI volumes as Z-Y-X image layers scaled by their voxel
    spacing (contrast: the MR percentile window; choose a CT window in the layer controls)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if not paths or not all(is_nifti(p) and Path(p).is_file() for p in paths):
        return None
    return _read_layers


def write_labels_layer(path: str, data, attributes: dict) -> list:
    """napari writer contribution: a Labels layer as NIfTI, with the geometry of the NIfTI
    volume it was made on (recorded in its metadata by the reader and the SAM 2 widget)."""
    source = ((attributes.get("metadata") or {}).get("napari_sam2") or {}).get("nifti_source")
    reference = source if source and Path(source).exists() else None
    return [str(write_nifti_labels(path, np.asarray(data), reference=reference, overwrite=True))]
