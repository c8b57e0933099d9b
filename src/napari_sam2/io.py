"""Reading images with their calibration and writing label TIFFs.

Reading: :func:`read_image_file` reads an image with its axes (T, Z, C, Y, X),
colour (RGB samples) and calibration (µm per pixel, seconds per frame) from
ImageJ, OME and LSM metadata through tifffile; :func:`layer_kwargs` turns
that into keyword arguments for napari's ``add_image``, and
:func:`napari_get_reader` is the napari reader for TIFF files.

Writing: :func:`write_labels` writes a label image atomically as an ImageJ
hyperstack (or an OME-TIFF for more than 65535 labels) with its axes and
calibration, never silently overwriting; :func:`labels_write_kwargs` recovers
the axes, voxel size and unit of a napari Labels layer for it.
"""

from __future__ import annotations

import copy
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .files import atomic_write

TIFF_SUFFIXES = (".tif", ".tiff")
#: key under which the axes and units of an image live in a napari layer's ``metadata``
METADATA_KEY = "napari_sam2"

# length units -> micrometres, time units -> seconds (lower-case keys)
_LENGTH_TO_UM = {
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "micrometers": 1.0, "micrometres": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "nanometers": 1e-3, "nanometres": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "millimeters": 1e3, "millimetres": 1e3,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4, "centimeters": 1e4, "centimetres": 1e4,
    "m": 1e6, "meter": 1e6, "metre": 1e6, "meters": 1e6, "metres": 1e6,
    "å": 1e-4, "angstrom": 1e-4, "ångström": 1e-4, "pm": 1e-6, "picometer": 1e-6,
    "in": 25400.0, "inch": 25400.0, "inches": 25400.0,
}
_TIME_TO_S = {
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "ms": 1e-3, "msec": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
    "µs": 1e-6, "μs": 1e-6, "us": 1e-6, "microsecond": 1e-6, "microseconds": 1e-6,
    "ns": 1e-9, "nanosecond": 1e-9, "nanoseconds": 1e-9,
    "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
}
_UNCALIBRATED = ("", "pixel", "pixels", "px", "frame", "frames", "none", "unit", "units")
_CANONICAL = "TZCYX"


def _norm_unit(unit: Any) -> str:
    """A unit string as written by ImageJ, OME or pint, normalised for the tables above."""
    text = str(unit if unit is not None else "").strip()
    text = re.sub(r"\\u00[bB]5", "µ", text)
    return text.replace("\u03bc", "µ").lower()


def _to_um(value: Any, unit: Any) -> Optional[float]:
    """``value`` in ``unit`` as micrometres; None when the unit is not a length."""
    factor = _LENGTH_TO_UM.get(_norm_unit(unit))
    return None if factor is None else float(value) * factor


def _to_s(value: Any, unit: Any) -> Optional[float]:
    factor = _TIME_TO_S.get(_norm_unit(unit))
    return None if factor is None else float(value) * factor


def _positive(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def read_image(path: Union[str, Path]) -> np.ndarray:
    """Read an image file: TIFF through tifffile, NIfTI through nibabel (as Z-Y-X),
    anything else through scikit-image.

    Only the pixels; :func:`read_image_file` also gives the axes and calibration.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {path} does not exist")
    if str(path).lower().endswith((".nii", ".nii.gz")):  # NIfTI: (Z, Y, X) = voxel axes (k, j, i)
        from .medical import read_nifti

        return read_nifti(path).data
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        return tifffile.imread(path)
    from skimage import io as skio

    return skio.imread(path)


@dataclass
class ImageFile:
    """An image with its axes and calibration, as read by :func:`read_image_file`.

    data: the pixels (a numpy array).
    axes: one letter per non-colour axis of ``data``, from T, Z, C, Y, X
        (e.g. "TZYX", "ZCYX"; "TYX" for an RGB time series); "Q" marks an
        axis that could not be named.
    rgb: the last axis of ``data`` holds RGB(A) colour samples (not in ``axes``).
    scale: size of one step along each axis of ``axes``: seconds for T,
        micrometres for Z, Y, X (when calibrated), 1 for C.
    units: per axis of ``axes``: "s" (T), "µm" (Z, Y, X), "pixel" where the
        file has no calibration, "" for C.
    channel_axis: index in ``data`` of the C axis, or None.
    name: a layer name (the file name without extension).
    """

    data: Any
    axes: str
    scale: Tuple[float, ...]
    units: Tuple[str, ...]
    channel_axis: Optional[int] = None
    rgb: bool = False
    name: str = ""
    path: Optional[Path] = None

    @property
    def calibrated(self) -> bool:
        """Whether the file gave a physical size for any axis."""
        return any(u not in ("pixel", "") for u in self.units)


def _map_axes(file_axes: str, shape: Sequence[int], planar_samples: str = "C") -> Tuple[str, bool]:
    """tifffile's axis letters -> (axes in T, Z, C, Y, X without the colour axis, rgb).

    'S' (samples) last with 3 or 4 values is RGB(A) colour; other samples are
    channels (C), or ``planar_samples``. Letters tifffile could not name ('Q', 'I',
    ...) become Z for a grey-level stack and T for a colour one (a colour stack is
    more often a movie), T and Z when there are two; what is left stays "Q".
    """
    letters = list(file_axes.upper())
    rgb = False
    if letters and letters[-1] == "S" and shape[-1] in (3, 4) and len(letters) >= 3:
        rgb = True
        letters = letters[:-1]
    out: List[Optional[str]] = []
    for letter in letters:
        if letter == "S":
            letter = planar_samples
        if letter in _CANONICAL and letter not in out:
            out.append(letter)
        else:
            out.append(None)
    unknown = [i for i, a in enumerate(out) if a is None]
    free = [a for a in "TZ" if a not in out]
    if unknown:
        if len(unknown) < len(free):
            free = ["T" if rgb else "Z"]
        for i, a in zip(unknown, free):  # outermost unknown gets T, canonical order
            out[i] = a
    axes = "".join(a or "Q" for a in out)
    return axes, rgb


def _first_tags(tif):
    pages = tif.pages
    return (pages.first if hasattr(pages, "first") else pages[0]).tags


def _pixel_size(tags, tag: str) -> Optional[float]:
    """The pixel size a resolution tag (pixels per unit, as a fraction) gives, if valid."""
    res = getattr(tags.get(tag), "value", None)
    try:
        return _positive(float(res[1]) / float(res[0]))
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None


def _imagej_calibration(tif) -> Dict[str, Tuple[float, str]]:
    """{axis: (step, unit)} from ImageJ metadata and the resolution tags."""
    meta = tif.imagej_metadata or {}
    tags = _first_tags(tif)
    cal: Dict[str, Tuple[float, str]] = {}
    unit = meta.get("unit")
    if unit is None:
        # no unit in the description: ImageJ takes it from ResolutionUnit (2 inch, 3 cm)
        resunit = int(getattr(tags.get("ResolutionUnit"), "value", 1) or 1)
        unit = {2: "inch", 3: "cm"}.get(resunit)
    for axis, tag, key in (("X", "XResolution", "unit"), ("Y", "YResolution", "yunit")):
        size = _pixel_size(tags, tag)
        if size is not None:
            cal[axis] = _calibrated_length(size, meta.get(key, unit))
    spacing = _positive(meta.get("spacing"))
    if spacing is not None:
        cal["Z"] = _calibrated_length(spacing, meta.get("zunit", unit))
    finterval = _positive(meta.get("finterval"))
    if finterval is None and _positive(meta.get("fps")):
        finterval = 1.0 / float(meta["fps"])
    if finterval is not None:
        seconds = _to_s(finterval, meta.get("tunit", "sec"))
        cal["T"] = (seconds, "s") if seconds is not None else (finterval, "pixel")
    return cal


def _calibrated_length(value: float, unit: Any) -> Tuple[float, str]:
    if unit is None or _norm_unit(unit) in _UNCALIBRATED:
        return float(value), "pixel"
    um = _to_um(value, unit)
    return (um, "µm") if um is not None else (float(value), str(unit))


def _ome_calibration(tif) -> Dict[str, Tuple[float, str]]:
    """{axis: (step, unit)} from the first image's OME Pixels element."""
    try:
        root = ET.fromstring(tif.ome_metadata)
    except (ET.ParseError, TypeError, ValueError):
        return {}
    pixels = next((el for el in root.iter() if el.tag.split("}")[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    cal: Dict[str, Tuple[float, str]] = {}
    for axis in "XYZ":
        size = _positive(pixels.get(f"PhysicalSize{axis}"))
        if size is not None:
            cal[axis] = _calibrated_length(size, pixels.get(f"PhysicalSize{axis}Unit", "µm"))
    dt = _positive(pixels.get("TimeIncrement"))
    if dt is not None:
        seconds = _to_s(dt, pixels.get("TimeIncrementUnit", "s"))
        cal["T"] = (seconds, "s") if seconds is not None else (dt, "pixel")
    return cal


def _lsm_calibration(tif) -> Dict[str, Tuple[float, str]]:
    meta = tif.lsm_metadata or {}
    cal: Dict[str, Tuple[float, str]] = {}
    for axis in "XYZ":
        size = _positive(meta.get(f"VoxelSize{axis}"))  # metres
        if size is not None:
            cal[axis] = (size * 1e6, "µm")
    dt = _positive(meta.get("TimeIntervall"))
    if dt is not None:
        cal["T"] = (dt, "s")
    return cal


def _tiff_resolution_calibration(tif) -> Dict[str, Tuple[float, str]]:
    """A plain TIFF's resolution tags, when in a metric unit (inch resolutions are
    screen or print dpi, not a pixel size)."""
    tags = _first_tags(tif)
    unit = {3: "cm", 4: "mm", 5: "µm"}.get(int(getattr(tags.get("ResolutionUnit"), "value", 1) or 1))
    if unit is None:
        return {}
    cal = {}
    for axis, tag in (("X", "XResolution"), ("Y", "YResolution")):
        size = _pixel_size(tags, tag)
        if size is not None:
            cal[axis] = _calibrated_length(size, unit)
    return cal


def _image_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_image_file(path: Union[str, Path]) -> ImageFile:
    """Read an image with its axes and calibration.

    TIFF files are read through tifffile (the first series): axes from the
    file (ImageJ hyperstack, OME, LSM or tifffile's own metadata), voxel size
    and frame interval from ImageJ (resolution tags, 'spacing', 'finterval',
    'unit'), OME (PhysicalSizeX/Y/Z, TimeIncrement and their units) or LSM
    metadata, converted to µm and seconds. Other files are read through
    scikit-image, their axes guessed ("YX", last axis of 3 or 4 values RGB).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {path} does not exist")
    cal: Dict[str, Tuple[float, str]] = {}
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data = series.asarray()
            file_axes = series.axes
            # tifffile.imwrite without metadata stores a (3 or 4, Y, X) grey-level stack
            # as planar "RGB": in a file with no other axis information, that is a stack
            planar = "Q" if tif.is_shaped and not (tif.is_imagej or tif.is_ome) else "C"
            if tif.is_imagej:
                cal = _imagej_calibration(tif)
            elif tif.is_ome:
                cal = _ome_calibration(tif)
            elif tif.is_lsm:
                cal = _lsm_calibration(tif)
            else:
                cal = _tiff_resolution_calibration(tif)
        if len(file_axes) != data.ndim:  # should not happen; fall back to guessing
            file_axes = _guess_file_axes(data.shape)
    else:
        from skimage import io as skio

        data = np.asarray(skio.imread(path))
        file_axes = _guess_file_axes(data.shape)
        planar = "C"
    axes, rgb = _map_axes(file_axes, data.shape, planar)
    scale, units = [], []
    for axis in axes:
        if axis == "C":
            scale.append(1.0)
            units.append("")
        elif axis in cal:
            scale.append(float(cal[axis][0]))
            units.append(cal[axis][1])
        else:
            scale.append(1.0)
            units.append("pixel")
    channel_axis = axes.index("C") if "C" in axes else None
    return ImageFile(
        data=data,
        axes=axes,
        scale=tuple(scale),
        units=tuple(units),
        channel_axis=channel_axis,
        rgb=rgb,
        name=_image_name(path),
        path=path,
    )


def _guess_file_axes(shape: Sequence[int]) -> str:
    ndim = len(shape)
    if ndim >= 3 and shape[-1] in (3, 4):
        return "Q" * (ndim - 3) + "YXS"
    if ndim < 2:
        return "X" * ndim
    return "Q" * (ndim - 2) + "YX"


def _napari_unit(unit: str) -> str:
    """A unit napari (pint) understands: "µm", "s", or "pixel" for anything else."""
    if _norm_unit(unit) in _LENGTH_TO_UM:
        return "µm" if _to_um(1.0, unit) == 1.0 else str(unit)
    if _norm_unit(unit) in _TIME_TO_S:
        return "s" if _to_s(1.0, unit) == 1.0 else str(unit)
    return "pixel"


def layer_kwargs(image: ImageFile) -> Dict[str, Any]:
    """Keyword arguments for napari's ``viewer.add_image(image.data, **kwargs)``
    (or the meta of a layer data tuple): scale, axis labels, units, rgb, name,
    and the axes and units in ``metadata["napari_sam2"]`` for the label writer.

    With a C axis, ``channel_axis`` makes napari split the channels into one
    layer each; scale, axis labels, units and metadata then describe one
    channel (the axes without C), and each layer is named after its channel.
    """
    keep = [i for i, a in enumerate(image.axes) if a != "C"]
    axes = "".join(image.axes[i] for i in keep)
    scale = tuple(float(image.scale[i]) for i in keep)
    units = tuple(image.units[i] for i in keep)
    info = {
        "axes": axes,
        "units": list(units),
        "scale": list(scale),
        "source": str(Path(image.path).absolute()) if image.path is not None else None,
        "image_axes": image.axes,
        "rgb": bool(image.rgb),
    }
    labels = tuple(axes)
    napari_units = tuple(_napari_unit(u) for u in units)
    kwargs: Dict[str, Any] = {"scale": scale, "name": image.name}
    if image.channel_axis is None:
        kwargs.update(
            axis_labels=labels, units=napari_units, rgb=bool(image.rgb), metadata={METADATA_KEY: info}
        )
        return kwargs
    n = int(np.shape(image.data)[image.channel_axis])
    kwargs.update(
        channel_axis=int(image.channel_axis),
        # napari splits these per channel: give one entry per channel
        axis_labels=[labels] * n,
        units=[napari_units] * n,
        metadata=[{METADATA_KEY: dict(copy.deepcopy(info), channel=c)} for c in range(n)],
        name=[f"{image.name} [{c}]" for c in range(n)],
        rgb=bool(image.rgb),
    )
    return kwargs


def read_layers(path: Union[str, Path, Sequence[Union[str, Path]]]) -> List[tuple]:
    """napari reader: TIFF files as image layer data tuples with their axes and calibration."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for p in paths:
        image = read_image_file(p)
        layers.append((image.data, layer_kwargs(image), "image"))
    return layers


def napari_get_reader(path):
    """napari reader contribution: :func:`read_layers` for TIFF files, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if not paths or not all(str(p).lower().endswith(TIFF_SUFFIXES) for p in paths):
        return None
    if not all(Path(p).is_file() for p in paths):
        return None
    return read_layers


def label_dtype(labels: np.ndarray) -> np.dtype:
    """uint16 when the labels fit, else uint32 (what Fiji reads as a label image)."""
    labels = np.asarray(labels)
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integers (one number per object, 0 for background), not {labels.dtype}; "
            "convert them first, e.g. np.rint(labels).astype(np.uint16)"
        )
    low = int(labels.min()) if labels.size else 0
    if low < 0:
        raise ValueError(
            f"labels must be non-negative (found {low}); 0 is background and objects are 1, 2, ...: "
            "relabel them first, e.g. with skimage.segmentation.relabel_sequential"
        )
    top = int(labels.max()) if labels.size else 0
    if top <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if top <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise ValueError(f"label {top} does not fit in 32 bits; relabel to consecutive numbers first")


def read_labels(path: Union[str, Path], axes: Optional[str], shape: Sequence[int]) -> np.ndarray:
    """A label TIFF written by :func:`write_labels` back in the layer's axis order ``axes``
    (write_labels stores axes in T, Z, C, Y, X order and readers drop axes of size 1), or
    NIfTI labels (Z-Y-X, as the viewer showed them). Raises InputError when it does not
    fit ``shape``."""
    from .model.preprocess import InputError

    shape = tuple(int(v) for v in shape)
    nifti = str(path).lower().endswith((".nii", ".nii.gz"))
    if nifti:  # already in the order the viewer showed
        from .medical import read_nifti

        data, have = np.asarray(read_nifti(path).data), "ZYX"
    else:
        try:
            f = read_image_file(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets one plain message
            raise InputError(f"could not read the labels file {path}: {err}") from None
        data, have = np.asarray(f.data), f.axes
    found = have
    if not nifti and axes and len(axes) == len(shape) and set(have) <= set(axes):
        for a in axes:  # axes of size 1 the reader dropped
            if a not in have:
                data, have = data[np.newaxis], a + have
        data = np.transpose(data, [have.index(a) for a in axes])
    if data.shape != shape:
        raise InputError(f"the labels file {path} holds an array of shape {data.shape} ({found}); the session's "
                         f"image has shape {shape}")
    return data


def guess_axes(ndim: int, info: Optional[dict] = None, axis_labels: Sequence[str] = ()) -> str:
    """The axis letters (TZCYX) of an ``ndim``-D image for saving: from the reader's
    metadata (``info["axes"]``), else the viewer's axis labels when they are such letters,
    else the usual order (YX, ZYX, TZYX, TZCYX)."""
    axes = str((info or {}).get("axes") or "").upper()
    if len(axes) == ndim and set(axes) <= set("TZCYX"):
        return axes
    labels = [str(a).upper() for a in axis_labels][-ndim:]
    if len(labels) == ndim and all(a in ("T", "Z", "C", "Y", "X") for a in labels) and len(set(labels)) == ndim:
        return "".join(labels)
    return {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TZCYX"}.get(ndim, "")


def stem_of(path: Union[str, Path]) -> str:
    """A file's name without its image or store suffix (``a.ome.tif`` -> ``a``, ``img.001.tif``
    -> ``img.001``, ``ct.nii.gz`` -> ``ct``)."""
    name = Path(path).name
    for suffix in (".sam2.zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif", ".nii.gz", ".nii", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def tiff_path(path: Union[str, Path]) -> Path:
    """``path`` with ``.tif`` added unless it already ends in .tif or .tiff."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return path
    return path.with_name(path.name + ".tif")


def _length_unit(unit: Optional[str]) -> Optional[str]:
    """The unit to write in ImageJ's description ("micron" for µm); None: uncalibrated."""
    if unit is None or _norm_unit(unit) in _UNCALIBRATED:
        return None
    return "micron" if _to_um(1.0, unit) == 1.0 else str(unit)


def write_labels(
    path: Union[str, Path],
    labels: np.ndarray,
    *,
    axes: Optional[str] = None,
    spacing: Optional[Sequence[Optional[float]]] = None,
    unit: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``labels`` as a TIFF that Fiji opens with its axes and voxel size, atomically.

    uint16 labels become an ImageJ hyperstack; more than 65535 labels need
    uint32, which ImageJ TIFFs cannot hold, so those become an OME-TIFF.

    path: ``.tif`` is added when the name does not end in .tif or .tiff; the
    path written is returned.
    axes: axis letters for the array from T, Z, C, Y, X (e.g. "ZYX", "TYX",
    "TZYX"; default "YX" / "ZYX" / "TZYX" by dimension).
    spacing: step per axis: seconds for T (ImageJ 'finterval', OME
    TimeIncrement), ``unit`` for Z, Y, X; None for an axis (or for all)
    writes no calibration for it.
    unit: the length unit of the spacing; default "micron" (µm) when spacing
    is given; "pixel" marks the image as uncalibrated.
    The file is written to a temporary name in the same folder and renamed
    into place, so a crash never leaves a half-written file; it gets the
    permissions of a new file (umask). An existing file is replaced only
    with ``overwrite=True``. Failures raise OSError (or ValueError) naming ``path``.
    """
    import tifffile

    path = tiff_path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    labels = np.asarray(labels)
    if axes is None:
        axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(labels.ndim)
        if axes is None:
            raise ValueError(f"cannot save a {labels.ndim}D label image without axes")
    axes = axes.upper()
    if len(axes) != labels.ndim:
        raise ValueError(f"axes {axes!r} do not match a {labels.ndim}D array")
    if len(set(axes)) != len(axes) or not set(axes) <= set(_CANONICAL) or not axes.endswith("YX"):
        raise ValueError(f"axes {axes!r} must be distinct letters from T, Z, C, Y, X ending in YX")
    data = labels.astype(label_dtype(labels), copy=False)
    if spacing is not None and len(spacing) != labels.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match axes {axes!r}")
    sp = {}
    for ax, value in zip(axes, spacing if spacing is not None else ()):
        v = _positive(value)
        if v is not None and ax != "C":
            sp[ax] = v
    if unit is None:
        unit = "micron" if any(ax in sp for ax in "ZYX") else None
    ordered = "".join(a for a in _CANONICAL if a in axes)
    if ordered != axes:
        # ImageJ (and OME as written by tifffile) store the axes in T, Z, C, Y, X order
        data = np.transpose(data, [axes.index(a) for a in ordered])
        axes = ordered
    length_unit = _length_unit(unit)
    if data.dtype == np.uint16:
        # ImageJ hyperstack: Fiji opens it with the right axes and calibration
        meta: Dict[str, Any] = {"axes": axes}
        if length_unit is not None:
            meta["unit"] = length_unit
        kwargs: Dict[str, Any] = {"imagej": True, "metadata": meta}
        if "X" in sp or "Y" in sp:
            kwargs["resolution"] = (1.0 / sp.get("X", sp.get("Y")), 1.0 / sp.get("Y", sp.get("X")))
        if "Z" in sp:
            meta["spacing"] = sp["Z"]
        if "T" in sp:
            meta["finterval"] = sp["T"]
    else:
        # ImageJ TIFFs cannot hold uint32: write OME-TIFF, which Fiji reads through Bio-Formats
        meta = {"axes": axes}
        if length_unit is not None:
            for ax in "XYZ":
                if ax in sp:
                    um = _to_um(sp[ax], unit)
                    if um is not None:
                        meta[f"PhysicalSize{ax}"] = um
                        meta[f"PhysicalSize{ax}Unit"] = "µm"
                    else:
                        meta[f"PhysicalSize{ax}"] = sp[ax]
        if "T" in sp:
            meta["TimeIncrement"] = sp["T"]
            meta["TimeIncrementUnit"] = "s"
        kwargs = {"ome": True, "metadata": meta}
    return atomic_write(
        path, lambda tmp: tifffile.imwrite(tmp, data, photometric="minisblack", **kwargs), what="labels"
    )


def labels_write_kwargs(source: Any, ndim: Optional[int] = None) -> Dict[str, Any]:
    """``axes``, ``spacing`` and ``unit`` for :func:`write_labels` from a napari Labels
    layer, a napari writer's layer attributes dict, or a layer ``metadata`` dict.

    The axes come from ``metadata["napari_sam2"]["axes"]`` (copied from the image,
    see :func:`layer_kwargs`), else from the layer's axis labels when they are
    axis letters, else "YX" / "ZYX" / "TZYX" by dimension. The spacing is the layer's
    scale (or the stored one); the unit comes from the stored units, so an
    uncalibrated image is saved uncalibrated and an axis without a known step
    (a frame interval of "pixel") gets none. Without stored units, a scale of all
    ones is taken as uncalibrated and any other scale as µm and seconds.
    """
    metadata, scale, axis_labels, units = _layer_parts(source)
    if ndim is None:
        ndim = getattr(source, "ndim", None)
        if ndim is None and scale is not None:
            ndim = len(scale)
    info = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if not isinstance(info, dict) and isinstance(metadata, dict) and "axes" in metadata:
        info = metadata  # the inner dict itself
    info = info if isinstance(info, dict) else {}
    if scale is None and info.get("scale") is not None:
        scale = tuple(info["scale"])
    if ndim is None:
        ndim = len(info["axes"]) if isinstance(info.get("axes"), str) else None
    if ndim is None:
        raise ValueError("cannot tell the number of dimensions of the labels")
    stored_units = None
    axes = info.get("axes")
    if _valid_axes(axes, ndim):
        axes = axes.upper()
        u = info.get("units")
        if u is not None and len(u) == ndim:
            stored_units = [str(x) for x in u]
    elif axis_labels is not None and _valid_axes("".join(str(a) for a in axis_labels), ndim):
        axes = "".join(str(a) for a in axis_labels).upper()
    else:
        axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(ndim)
    if stored_units is None and units is not None and len(units) == ndim:
        napari_units = [str(x) for x in units]
        if any(_norm_unit(x) not in _UNCALIBRATED for x in napari_units):
            stored_units = napari_units
    if scale is not None and len(scale) != ndim:
        scale = None
    if scale is None:
        return {"axes": axes, "spacing": None, "unit": None}
    scale = [float(s) for s in scale]
    if stored_units is None:
        if all(s == 1.0 for s in scale):
            return {"axes": axes, "spacing": None, "unit": None}
        return {"axes": axes, "spacing": tuple(scale), "unit": "micron"}
    spacing: List[Optional[float]] = []
    length_unit = None
    for ax, s, u in zip(axes or "", scale, stored_units):
        if ax == "T":
            seconds = _to_s(s, u) if _norm_unit(u) not in _UNCALIBRATED else None
            spacing.append(seconds)
        elif ax in "ZYX":
            if _norm_unit(u) in _UNCALIBRATED:
                spacing.append(s)  # keeps the aspect ratio, claims no unit
            else:
                um = _to_um(s, u)
                spacing.append(um if um is not None else s)
                if um is not None:
                    length_unit = "micron"
                elif length_unit is None:
                    length_unit = u
        else:
            spacing.append(None)
    if length_unit is None:
        # uncalibrated space: keep a non-trivial aspect ratio, but no unit
        return {"axes": axes, "spacing": tuple(spacing), "unit": "pixel"}
    return {"axes": axes, "spacing": tuple(spacing), "unit": length_unit}


def _valid_axes(axes: Any, ndim: int) -> bool:
    return (
        isinstance(axes, str)
        and len(axes) == ndim
        and len(set(axes.upper())) == ndim
        and set(axes.upper()) <= set(_CANONICAL)
    )


def _layer_parts(source: Any):
    """(metadata, scale, axis_labels, units) of a layer, an attributes dict or a metadata dict."""
    if isinstance(source, dict):
        if "metadata" in source or "scale" in source:
            return (
                source.get("metadata") or {},
                source.get("scale"),
                source.get("axis_labels"),
                source.get("units"),
            )
        return source, None, None, None
    return (
        getattr(source, "metadata", None) or {},
        getattr(source, "scale", None),
        getattr(source, "axis_labels", None),
        getattr(source, "units", None),
    )


def write_labels_layer(path: str, data, attributes: dict) -> list:
    """napari writer: a Labels layer as a label TIFF with its axes and voxel size.

    Axes and units come from ``metadata["napari_sam2"]`` when the layer has them
    (see :func:`labels_write_kwargs`); napari asks before replacing an existing
    file, so this overwrites.
    """
    data = np.asarray(data)
    out = write_labels(path, data, **labels_write_kwargs(attributes, data.ndim), overwrite=True)
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


def write_ome_zarr_labels(path: Union[str, Path], labels: np.ndarray, *, axes: Optional[str] = None,
                          overwrite: bool = False) -> Path:
    """Write a label image as OME-Zarr (NGFF 0.4, zarr format 2, one chunk per 2D slice),
    for stacks too large for one TIFF. Built under a temporary name and renamed when complete.

    axes: letters from T, Z, C, Y, X (default "YX" / "ZYX" / "TZYX" by dimension)."""
    import shutil

    import zarr

    path = Path(path)
    labels = np.asarray(labels)
    axes = (axes or {2: "YX", 3: "ZYX", 4: "TZYX"}.get(labels.ndim, "")).upper()
    if len(axes) != labels.ndim:
        raise ValueError(f"axes {axes!r} do not fit labels of {labels.ndim} dimensions")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kind = {"T": "time", "C": "channel"}
        group = zarr.open_group(str(tmp), mode="w", **({"zarr_format": 2} if zarr.__version__[0] >= "3" else {}))
        chunks = (1,) * (labels.ndim - 2) + labels.shape[-2:]
        if hasattr(group, "create_array"):
            arr = group.create_array("0", shape=labels.shape, chunks=chunks, dtype=labels.dtype)
        else:
            arr = group.create_dataset("0", shape=labels.shape, chunks=chunks, dtype=labels.dtype)
        arr[...] = labels
        group.attrs["multiscales"] = [{
            "version": "0.4", "name": path.name,
            "axes": [{"name": a.lower(), "type": kind.get(a, "space")} for a in axes],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * labels.ndim}]}],
        }]
        group.attrs["image-label"] = {"version": "0.4", "source": {"image": "../../"}}
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
