"""Reading images and writing label TIFFs (atomic, never silently overwriting)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np


def read_image(path: Union[str, Path]) -> np.ndarray:
    """Read an image file: TIFF through tifffile, anything else through scikit-image."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {path} does not exist")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    from skimage import io as skio

    return skio.imread(path)


def label_dtype(labels: np.ndarray) -> np.dtype:
    """uint16 when the labels fit, else uint32 (what Fiji reads as a label image)."""
    top = int(labels.max()) if labels.size else 0
    if int(labels.min() if labels.size else 0) < 0:
        raise ValueError("labels must be non-negative")
    if top <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if top <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise ValueError(f"label {top} does not fit in 32 bits")


def write_labels(
    path: Union[str, Path],
    labels: np.ndarray,
    *,
    axes: Optional[str] = None,
    spacing: Optional[Sequence[float]] = None,
    unit: str = "micron",
    overwrite: bool = False,
) -> Path:
    """Write ``labels`` as a TIFF that Fiji opens with its axes and voxel size, atomically.

    uint16 labels become an ImageJ hyperstack; more than 65535 labels need
    uint32, which ImageJ TIFFs cannot hold, so those become an OME-TIFF.

    axes: ImageJ axis letters for the array (e.g. "ZYX", "TYX", "TZYX"; default
    "YX" / "ZYX" / "TZYX" by dimension); spacing: voxel size per axis.
    The file is written to a temporary name in the same folder and renamed
    into place, so a crash never leaves a half-written file. An existing
    file is replaced only with ``overwrite=True``.
    """
    import tifffile

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    labels = np.asarray(labels)
    if axes is None:
        axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(labels.ndim)
        if axes is None:
            raise ValueError(f"cannot save a {labels.ndim}D label image without axes")
    if len(axes) != labels.ndim:
        raise ValueError(f"axes {axes!r} do not match a {labels.ndim}D array")
    data = labels.astype(label_dtype(labels), copy=False)
    sp = dict(zip(axes, spacing)) if spacing is not None else {}
    resolution = (1.0 / float(sp.get("X", 1.0)), 1.0 / float(sp.get("Y", 1.0))) if sp else None
    if data.dtype == np.uint16:
        # ImageJ hyperstack: Fiji opens it with the right axes and calibration
        kwargs = dict(imagej=True, resolution=resolution, metadata={"axes": axes, "unit": unit})
        if "Z" in sp:
            kwargs["metadata"]["spacing"] = float(sp["Z"])
        if "T" in sp:
            kwargs["metadata"]["finterval"] = float(sp["T"])
    else:
        # ImageJ TIFFs cannot hold uint32: write OME-TIFF, which Fiji reads through Bio-Formats
        meta = {"axes": axes}
        for ax, key in (("X", "PhysicalSizeX"), ("Y", "PhysicalSizeY"), ("Z", "PhysicalSizeZ")):
            if ax in sp:
                meta[key] = float(sp[ax])
                meta[key + "Unit"] = "µm"
        if "T" in sp:
            meta["TimeIncrement"] = float(sp["T"])
        kwargs = dict(ome=True, metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        tifffile.imwrite(tmp, data, photometric="minisblack", **kwargs)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_labels_layer(path: str, data, attributes: dict) -> list:
    """napari writer: a Labels layer as a label TIFF with its voxel size.

    napari asks before replacing an existing file, so this overwrites.
    """
    data = np.asarray(data)
    scale = attributes.get("scale")
    axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(data.ndim)
    out = write_labels(path, data, axes=axes, spacing=None if scale is None else tuple(scale), overwrite=True)
    return [str(out)]


class TiffStack:
    """A multi-page TIFF as a lazy array-like (N, H, W[, C]): each slice is read from
    disk when indexed and not kept, so a stack of any length costs one slice of memory."""

    def __init__(self, path: Union[str, Path]) -> None:
        import tifffile

        self.path = Path(path)
        self._tif = tifffile.TiffFile(self.path)
        pages = self._tif.pages
        first = pages.first if hasattr(pages, "first") else pages[0]
        self.shape = (len(pages),) + tuple(first.shape)
        self.dtype = np.dtype(first.dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):
            head, rest = index[0], index[1:]
        else:
            head, rest = index, ()
        if not isinstance(head, (int, np.integer)):
            raise TypeError("TiffStack is indexed one slice at a time: stack[i] or stack[i, ...]")
        arr = self._tif.pages[int(head)].asarray()
        return arr[rest] if rest else arr

    def close(self) -> None:
        self._tif.close()
