"""Generated sample data (no download): touching nuclei in 3D, moving cells in 2D+t.

Both are 16-bit with noise, uneven brightness and texture, and come with their
ground-truth instance labels (used by tests and, later, training).
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(rng.normal(size=shape), sigma)


def nuclei_3d(
    shape: Tuple[int, int, int] = (32, 192, 192), n: int = 14, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """A z-stack of touching ellipsoidal nuclei: (image uint16, labels uint16)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    labels = np.zeros(shape, np.uint16)
    best = np.full(shape, np.inf, np.float32)
    brightness = {}
    for k in range(1, n + 1):
        c = rng.uniform([shape[0] * 0.3, 20, 20], [shape[0] * 0.7, shape[1] - 20, shape[2] - 20])
        r = rng.uniform([shape[0] * 0.18, 14, 14], [shape[0] * 0.3, 26, 26])
        d = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2
        inside = (d < 1.0) & (d < best)  # touching nuclei split where each is "deeper"
        labels[inside] = k
        best[inside] = d[inside]
        brightness[k] = rng.uniform(0.5, 1.0)
    signal = np.zeros(shape, np.float32)
    for k, b in brightness.items():
        signal[labels == k] = b
    texture = 1 + 0.25 * _smooth_noise(rng, shape, 1.5) / 0.05
    signal = signal * np.clip(texture, 0.3, 2.0)
    from scipy import ndimage

    signal = ndimage.gaussian_filter(signal, (1.2, 1.0, 1.0))  # optics
    image = 800 + 2500 * signal + rng.normal(0, 120, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def cells_2d_time(
    shape: Tuple[int, int, int] = (24, 192, 192), n: int = 8, seed: int = 1
) -> Tuple[np.ndarray, np.ndarray]:
    """A time series (T, Y, X) of moving, slowly deforming cells: (image uint16, labels uint16)."""
    rng = np.random.default_rng(seed)
    t_len, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pos = rng.uniform(25, [h - 25, w - 25], (n, 2))
    vel = rng.normal(0, 1.2, (n, 2))
    radii = rng.uniform(10, 18, (n, 2))
    angle = rng.uniform(0, np.pi, n)
    bright = rng.uniform(0.5, 1.0, n)
    image = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint16)
    from scipy import ndimage

    for t in range(t_len):
        best = np.full((h, w), np.inf, np.float32)
        for k in range(n):
            cy, cx = pos[k] + vel[k] * t
            cy, cx = np.clip(cy, 15, h - 15), np.clip(cx, 15, w - 15)
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
    image = 600 + 3000 * image * (1 + 0.2 * _smooth_noise(rng, shape, 2.0) / 0.05) + rng.normal(0, 150, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def make_nuclei_3d() -> List[tuple]:
    """napari sample-data contribution."""
    image, _ = nuclei_3d()
    return [(image, {"name": "nuclei 3D", "scale": (2.0, 0.5, 0.5), "contrast_limits": (500, 3800)}, "image")]


def make_cells_2d_time() -> List[tuple]:
    """napari sample-data contribution."""
    image, _ = cells_2d_time()
    return [(image, {"name": "cells 2D+t", "contrast_limits": (400, 4200)}, "image")]
