"""Every coordinate conversion between the user's data and the model, in one place.

Four frames of reference, from the data to the model:

- **data axes**: an n-D image (optionally with a trailing RGB axis) and its labels
  array, indexed in the array's own axis order;
- **view**: one 2D slice as the viewer shows it, (rows, columns) = the two
  *displayed* axes in display order; when ``displayed[0] > displayed[1]`` the view
  is the data slice transposed;
- **(x, y)**: pixel coordinates of a view, x the column, y the row, pixel centres
  at integers (what sessions and the image predictor take);
- **model input**: (x, y) on the model's square ``size x size`` input, to which
  every slice is resized whatever its aspect ratio.

The ensemble's orientations (quarter turns, then a mirror image) act on model
input: :func:`orient` / :func:`unorient` on images and logits, :func:`orient_xy`
on coordinates.

Pure numpy / PyTorch: no napari, no Qt.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "AxisView", "corners_to_box", "data_to_view", "fixed_coords", "is_transposed", "labels_index",
    "mask_to_model", "on_slice", "orient", "orient_xy", "point_rc", "rc_to_xy", "unorient",
    "view_to_data", "xy_to_model",
]

# ---------------------------------------------------------------- data axes <-> view


def is_transposed(displayed: Sequence[int]) -> bool:
    """Whether the view (rows, columns) is the data slice transposed: the row axis comes
    after the column axis in the array."""
    return int(displayed[0]) > int(displayed[1])


def data_to_view(arr: np.ndarray, displayed: Sequence[int]) -> np.ndarray:
    """One slice in the array's axis order (H W or H W C) -> view order (rows, columns[, C])."""
    return np.swapaxes(arr, 0, 1) if is_transposed(displayed) else arr


def view_to_data(arr: np.ndarray, displayed: Sequence[int]) -> np.ndarray:
    """One slice in view order (rows, columns[, C]) -> the array's axis order (the
    inverse of :func:`data_to_view`)."""
    return np.swapaxes(arr, 0, 1) if is_transposed(displayed) else arr


def point_rc(coord: Sequence[float], displayed: Sequence[int]) -> Tuple[float, float]:
    """The n-D data coordinate of a point -> its (row, column) in the view."""
    return float(coord[displayed[0]]), float(coord[displayed[1]])


def data_point(position: Sequence[float], rc: Sequence[float], displayed: Sequence[int]) -> list:
    """A (row, column) of the view on the slice at ``position`` -> its n-D data coordinate
    (the inverse of :func:`point_rc`)."""
    c = [float(v) for v in position]
    c[displayed[0]], c[displayed[1]] = float(rc[0]), float(rc[1])
    return c


def on_slice(coord: Sequence[float], position: Sequence[int], displayed: Sequence[int]) -> bool:
    """Whether an n-D data coordinate lies on the slice shown at ``position`` (every axis
    but the displayed ones, rounded to the nearest integer, equals the position's)."""
    return all(round(coord[a]) == int(position[a]) for a in range(len(position)) if a not in displayed)


def fixed_coords(position: Sequence[int], ndim: int, axis: Optional[int], displayed: Sequence[int]) -> Dict[int, int]:
    """{axis: coordinate} of a position's fixed axes: neither displayed nor the propagation
    ``axis`` (e.g. the time point of a T-Z-Y-X movie propagated along Z), in axis order."""
    return {a: int(position[a]) for a in range(ndim) if a != axis and a not in displayed}


def labels_index(
    ndim: int, axis: Optional[int], displayed: Sequence[int], fixed: Mapping[int, int], frame: Optional[int] = None
) -> tuple:
    """The n-D index into a labels array (the image's shape without RGB): the displayed axes
    whole, the propagation ``axis`` at ``frame`` (whole when ``frame`` is None: every slice
    of a session), other axes at ``fixed`` (0 where it has no entry)."""
    idx = []
    for a in range(ndim):
        if a == axis:
            idx.append(slice(None) if frame is None else int(frame))
        elif a in displayed:
            idx.append(slice(None))
        else:
            idx.append(int(fixed.get(a, 0)))
    return tuple(idx)


class AxisView:
    """Lazy (N, H, W[, C]) view of an n-D array: slices along ``axis``, others fixed.

    Slices come in view order (rows, columns), read only when indexed (numpy, dask,
    zarr, memmaps alike). ``axis`` None: a 2D image, one slice.
    """

    def __init__(self, data, *, axis: Optional[int], displayed: Tuple[int, int], fixed: Dict[int, int], rgb: bool) -> None:
        self.data, self.axis, self.displayed, self.fixed, self.rgb = data, axis, tuple(displayed), dict(fixed), rgb
        shape = tuple(data.shape)
        n = 1 if axis is None else shape[axis]
        self.shape = (n, shape[displayed[0]], shape[displayed[1]]) + ((shape[-1],) if rgb else ())
        self.dtype = np.dtype(data.dtype)

    def index(self, i: int) -> tuple:
        """The n-D index (without the RGB axis) of slice ``i``."""
        nd = len(self.data.shape) - (1 if self.rgb else 0)
        return labels_index(nd, self.axis, self.displayed, self.fixed, int(i))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        arr = self.data[self.index(i)]
        if hasattr(arr, "compute"):
            arr = arr.compute()
        return data_to_view(np.asarray(arr), self.displayed)


# ---------------------------------------------------------------- view <-> (x, y)


def rc_to_xy(rows_cols) -> np.ndarray:
    """(row, column) pairs -> N x 2 float32 (x, y) = (column, row)."""
    rc = np.asarray(rows_cols, dtype=np.float32).reshape(-1, 2)
    return rc[:, ::-1].copy()


def corners_to_box(corners) -> np.ndarray:
    """Corners of a rectangle as (row, column) pairs (two opposite ones, or all four) ->
    the box (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, float32."""
    xy = rc_to_xy(corners)
    return np.concatenate([xy.min(0), xy.max(0)])


# ---------------------------------------------------------------- (x, y) <-> model input


def xy_to_model(xy: np.ndarray, hw: Tuple[int, int], size: int) -> np.ndarray:
    """... x 2 (x, y) pixels of an H x W slice -> the same places on the model's
    ``size x size`` input (each axis scaled on its own), float32."""
    h, w = hw
    return np.asarray(xy, np.float32) * np.array([size / w, size / h], dtype=np.float32)


def mask_to_model(mask: np.ndarray, size: int, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """An H x W mask (bool or numbers, > 0 inside) -> 1 1 size size float 0/1 tensor on
    ``device``: resized (bilinear with antialiasing, then >= 0.5) as the image is."""
    t = torch.from_numpy(np.asarray(mask).astype(np.float32) > 0).float()[None, None].to(device)  # 1 1 H W
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        t = (t >= 0.5).float()
    return t


# ---------------------------------------------------------------- orientations (model input)


def orient(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """A view of ``t`` (... H W) in orientation (k quarter turns, then mirror)."""
    t = torch.rot90(t, k, (-2, -1)) if k else t
    return t.flip(-1) if flip else t


def unorient(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """The inverse of :func:`orient`."""
    t = t.flip(-1) if flip else t
    return torch.rot90(t, -k, (-2, -1)) if k else t


def orient_xy(xy: np.ndarray, size: int, k: int, flip: bool) -> np.ndarray:
    """N x 2 (x, y) model-input coordinates (pixel centres at integers, a square of
    side ``size``) -> the same places in orientation (k, flip)."""
    x, y = xy[:, 0].astype(np.float32), xy[:, 1].astype(np.float32)
    for _ in range(k % 4):  # np.rot90 / torch.rot90: out[i, j] = in[j, size - 1 - i]
        x, y = y, size - 1 - x
    if flip:
        x = size - 1 - x
    return np.stack([x, y], axis=1).astype(np.float32)
