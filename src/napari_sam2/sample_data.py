"""Generated microscopy-like data (no download), with ground-truth instance labels.

- :func:`nuclei_3d`: a z-stack of touching, textured, ellipsoidal or lumpy nuclei;
- :func:`cells_2d_time`: a time series of moving, slowly deforming cells;
- :func:`random_stack`: either of the two with randomly drawn size, shape,
  brightness, density, noise and background (the training data of the bundled
  nano model, see ``napari_sam2.training``).

All are 16-bit with noise, uneven brightness and texture. The defaults of the
first two are the napari sample data.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["cells_2d_time", "make_cells_2d_time", "make_nuclei_3d", "nuclei_3d", "random_stack"]


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian noise smoothed by ``sigma`` and rescaled to unit standard deviation."""
    n = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return n / max(float(n.std()), 1e-6)


def _finish(signal: np.ndarray, rng, *, background: float, gain: float, noise: float, blur, gradient: float) -> np.ndarray:
    """Optics blur, an uneven background, camera noise; -> uint16."""
    if np.any(blur):
        signal = ndimage.gaussian_filter(signal, blur)
    shape = signal.shape
    ramp = np.linspace(-1, 1, shape[-1], dtype=np.float32)[None, None, :] * gradient
    image = background * (1 + ramp) + gain * signal + rng.normal(0, noise, shape)
    return np.clip(image, 0, 65535).astype(np.uint16)


def _contacts(labels: np.ndarray) -> np.ndarray:
    """Voxels of an object that have a face neighbour in another object (not background)."""
    out = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        o = np.moveaxis(out, axis, 0)  # a view: writes land in out
        touch = (a[1:] != a[:-1]) & (a[1:] > 0) & (a[:-1] > 0)
        o[1:] |= touch
        o[:-1] |= touch
    return out


def nuclei_3d(
    shape: Tuple[int, int, int] = (32, 192, 192),
    n: int = 14,
    seed: int = 0,
    *,
    radius_xy: Tuple[float, float] = (14, 26),
    radius_z: Tuple[float, float] = (0.18, 0.3),
    brightness: Tuple[float, float] = (0.5, 1.0),
    lumpiness: float = 0.0,
    texture: float = 0.25,
    noise: float = 120.0,
    background: float = 800.0,
    gradient: float = 0.0,
    seam: float = 0.4,
) -> Tuple[np.ndarray, np.ndarray]:
    """A z-stack of touching nuclei: (image uint16, labels uint16).

    radius_xy: range of in-plane semi-axes (pixels); radius_z: range of the
    z semi-axis as a fraction of the depth; lumpiness: 0 for ellipsoids, up to
    ~0.4 for irregular blobs; texture: strength of the chromatin-like texture;
    noise: camera noise (grey levels); gradient: background ramp across x;
    seam: how much dimmer the voxels are where two nuclei touch (0: not at all,
    so that touching nuclei of similar brightness show no boundary; stained
    nuclei show a darker line where their envelopes meet).
    """
    rng = np.random.default_rng(seed)
    depth, h, w = shape
    labels = np.zeros(shape, np.uint16)
    best = np.full(shape, np.inf, np.float32)
    levels = {}
    margin = min(20, h // 4, w // 4)
    for k in range(1, n + 1):
        c = rng.uniform([depth * 0.3, margin, margin], [depth * 0.7, h - margin, w - margin])
        r = rng.uniform([depth * radius_z[0], radius_xy[0], radius_xy[0]], [depth * radius_z[1], radius_xy[1], radius_xy[1]])
        levels[k] = rng.uniform(*brightness)
        # only the bounding box of the nucleus is computed
        lo = np.maximum(np.floor(c - r * 1.5), 0).astype(int)
        hi = np.minimum(np.ceil(c + r * 1.5) + 1, shape).astype(int)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        z, y, x = np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij")
        d = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2
        if lumpiness > 0:
            d = d * (1 + lumpiness * _smooth_noise(rng, d.shape, max(r[1] / 3, 1.0)))
        inside = (d < 1.0) & (d < best[box])  # touching nuclei split where each is "deeper"
        labels[box][inside] = k
        best[box][inside] = d[inside]
    signal = np.zeros(shape, np.float32)
    for k, b in levels.items():
        signal[labels == k] = b
    if seam > 0:
        signal[_contacts(labels)] *= 1.0 - seam
    tex = 1 + texture * _smooth_noise(rng, shape, 1.5)
    signal = signal * np.clip(tex, 0.3, 2.0)
    image = _finish(signal, rng, background=background, gain=2500, noise=noise, blur=(1.2, 1.0, 1.0), gradient=gradient)
    return image, labels


def cells_2d_time(
    shape: Tuple[int, int, int] = (24, 192, 192),
    n: int = 8,
    seed: int = 1,
    *,
    radius: Tuple[float, float] = (10, 18),
    speed: float = 1.2,
    brightness: Tuple[float, float] = (0.5, 1.0),
    texture: float = 0.2,
    noise: float = 150.0,
    background: float = 600.0,
    gradient: float = 0.0,
) -> Tuple[np.ndarray, np.ndarray]:
    """A time series (T, Y, X) of moving, slowly deforming cells: (image uint16, labels uint16).

    Cells are brighter in the middle; speed is the standard deviation of
    their velocity in pixels per frame.
    """
    rng = np.random.default_rng(seed)
    t_len, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    margin = min(25, h // 4, w // 4)
    pos = rng.uniform(margin, [h - margin, w - margin], (n, 2))
    vel = rng.normal(0, speed, (n, 2))
    radii = rng.uniform(radius[0], radius[1], (n, 2))
    angle = rng.uniform(0, np.pi, n)
    bright = rng.uniform(brightness[0], brightness[1], n)
    image = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint16)
    edge = min(15, h // 6, w // 6)
    for t in range(t_len):
        best = np.full((h, w), np.inf, np.float32)
        for k in range(n):
            cy, cx = pos[k] + vel[k] * t
            cy, cx = np.clip(cy, edge, h - edge), np.clip(cx, edge, w - edge)
            a = angle[k] + 0.05 * t
            dy, dx = yy - cy, xx - cx
            u = dx * np.cos(a) + dy * np.sin(a)
            v = -dx * np.sin(a) + dy * np.cos(a)
            ry, rx = radii[k] * (1 + 0.08 * np.sin(0.4 * t + k))
            d = (u / rx) ** 2 + (v / ry) ** 2
            inside = (d < 1) & (d < best)
            labels[t][inside] = k + 1
            best[inside] = d[inside]
            image[t][inside] = bright[k] * (1 - 0.3 * d[inside])  # brighter centre
        image[t] = ndimage.gaussian_filter(image[t], 1.0)
    image = image * (1 + texture * _smooth_noise(rng, shape, 2.0))
    image = _finish(image, rng, background=background, gain=3000, noise=noise, blur=0.0, gradient=gradient)
    return image, labels


def random_stack(seed: int, *, kind: str = "any", size: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A generated stack with randomly drawn settings: (image uint16, labels uint16).

    kind: "nuclei" (3D), "cells" (2D+t) or "any" (either, 60 / 40). size: the
    side of the slices (0: drawn from 160..320 px). Everything else — object
    count (density), sizes, lumpiness, brightness range, texture, noise,
    background level and ramp — is drawn from ``seed``.
    """
    rng = np.random.default_rng([seed, 9173])
    if kind == "any":
        kind = "nuclei" if rng.random() < 0.6 else "cells"
    side = int(size) if size else int(rng.choice([160, 192, 224, 256, 288, 320]))
    scale = side / 192
    bright_lo = rng.uniform(0.2, 0.8)
    common = {  # drawn in this order
        "brightness": (bright_lo, min(bright_lo + rng.uniform(0.1, 0.6), 1.2)),
        "texture": rng.uniform(0.05, 0.4),
        "noise": rng.uniform(40, 300),
        "background": rng.uniform(300, 1500),
        "gradient": rng.uniform(-0.3, 0.3),
    }
    sub = int(rng.integers(0, 2**31))
    if kind == "nuclei":
        r_lo = rng.uniform(7, 18) * scale
        r_hi = r_lo * rng.uniform(1.2, 1.9)
        area = np.pi * ((r_lo + r_hi) / 2) ** 2
        density = rng.uniform(0.2, 0.9)  # fraction of the slice area the nuclei would cover
        n = int(np.clip(density * side * side / area, 2, 60))
        depth = int(rng.integers(20, 41))
        seam = rng.uniform(0.15, 0.6)  # drawn last: the other settings of a seed stay as they were
        return nuclei_3d(
            (depth, side, side), n, sub, radius_xy=(r_lo, r_hi),
            radius_z=(rng.uniform(0.08, 0.2), rng.uniform(0.2, 0.35)),
            lumpiness=rng.uniform(0.0, 0.35), seam=seam, **common,
        )
    if kind == "cells":
        r_lo = rng.uniform(6, 16) * scale
        r_hi = r_lo * rng.uniform(1.2, 1.8)
        area = np.pi * ((r_lo + r_hi) / 2) ** 2
        n = int(np.clip(rng.uniform(0.15, 0.6) * side * side / area, 2, 40))
        length = int(rng.integers(16, 33))
        return cells_2d_time(
            (length, side, side), n, sub, radius=(r_lo, r_hi), speed=rng.uniform(0.3, 2.0) * scale, **common
        )
    raise ValueError(f"kind must be 'nuclei', 'cells' or 'any', got {kind!r}")


def make_nuclei_3d() -> List[tuple]:
    """napari sample-data contribution."""
    image, _ = nuclei_3d()
    return [(image, {"name": "nuclei 3D", "scale": (2.0, 0.5, 0.5), "contrast_limits": (500, 3800)}, "image")]


def make_cells_2d_time() -> List[tuple]:
    """napari sample-data contribution."""
    image, _ = cells_2d_time()
    return [(image, {"name": "cells 2D+t", "contrast_limits": (400, 4200)}, "image")]
