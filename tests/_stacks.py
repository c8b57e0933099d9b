"""Small test stacks and helpers shared by the controller and widget tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def present_tiny_model(size: int = 128, *, seed: int = 0, bias: float = 8.0, config: str = "sam2.1_hiera_tiny"):
    """A model (2.1-tiny unless ``config`` names another) at ``size`` px with seeded random
    weights whose object score says "present" (``bias`` 8; -8: "absent" unless the memory
    pulls it up), so that random-weight masks are informative."""
    from napari_sam2.model import build_model, get_config

    torch.manual_seed(seed)
    m = build_model(get_config(config).with_image_size(size))
    with torch.no_grad():
        m.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(bias)
    return m.eval()


def disc_stack(n, h, w, discs, *, seed=0, background=(1000.0, 60.0), dtype=np.uint16):
    """Bright discs drifting through ``n`` slices of Gaussian noise (mean, sd ``background``).
    discs: (row, column, rows per slice, columns per slice, squared radius, brightness)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    v = rng.normal(background[0], background[1], (n, h, w))
    for t in range(n):
        for y, x, dy, dx, r2, amp in discs:
            v[t][(yy - y - dy * t) ** 2 + (xx - x - dx * t) ** 2 < r2] += amp
    return v.astype(dtype)


def two_blob_volume(n=8, h=48, w=56, seed=0, dtype=np.uint16):
    """Two bright discs drifting through ``n`` slices of noise."""
    return disc_stack(n, h, w, [(18, 20, 1, 0, 80, 1500), (30, 40, 0, -1, 60, 1200)], seed=seed, dtype=dtype)


def paint_by_hand(labels, index, masks):
    """What a labels slice should hold after masks: each object's pixels replaced by its
    mask, other objects' pixels kept (written here, independent of the package)."""
    sl = labels[index]
    for obj, m in masks.items():
        sl[sl == obj] = 0
        sl[np.asarray(m, bool) & (sl == 0)] = obj
    labels[index] = sl


@pytest.fixture(autouse=True)
def drain_qt_workers(qtbot):
    """Let background workers (e.g. slice prefetch) finish before the viewer is torn down.
    Autouse in the widget test modules that import it."""
    yield
    from qtpy.QtCore import QThreadPool

    QThreadPool.globalInstance().waitForDone(60_000)
    qtbot.wait(10)


def click(viewer, widget, z, y, x):
    """Go to slice ``z`` of a Z-Y-X viewer and click at (y, x) in the widget's clicks layer."""
    step = list(viewer.dims.current_step)
    step[0] = z
    viewer.dims.current_step = tuple(step)
    widget.points_layer.add(np.array([[z, y, x]], float))


def rgb_blobs(seed: int, h: int, w: int, count: int, margin: float, radius) -> np.ndarray:
    """An RGB uint8 image: ``count`` bright discs of ``radius`` (low, high) pixels, at least
    ``margin`` from the border, on noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = rng.normal(40, 10, (h, w, 3))
    for _ in range(count):
        cy, cx, r = rng.uniform(margin, h - margin), rng.uniform(margin, w - margin), rng.uniform(*radius)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] += rng.uniform(80, 180, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def click_objects(viewer, qtbot, widget, clicks, *, propagate=None, timeout=60_000):
    """One click per object, each (z, y, x) a new object after the first, waiting for each
    result; then a propagation in ``propagate`` ("forward", "backward", "both"), if given."""
    for k, (z, y, x) in enumerate(clicks):
        if k:
            widget.new_object()
        click(viewer, widget, z, y, x)
        qtbot.waitUntil(lambda: not widget.is_busy, timeout=timeout)
    if propagate:
        widget.propagate(propagate)
        qtbot.waitUntil(lambda: not widget.is_busy, timeout=timeout)


def moving_nuclei_movie(t=4, z=12, hw=(96, 96), count=4, seed=0, step=3.0, dtype=np.uint16):
    """A T-Z-Y-X movie of textured ellipsoid nuclei (anisotropic: 2.5 times flatter in z)
    drifting ``step`` pixels per time point in y-x and a little in z: (movie, truth)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    h, w = hw
    zz, yy, xx = np.mgrid[0:z, 0:h, 0:w].astype(np.float32)
    centres = []
    while len(centres) < count:
        c = np.array([rng.uniform(z * 0.35, z * 0.65), rng.uniform(20, h - 20), rng.uniform(20, w - 20)])
        if all(np.hypot(*(c[1:] - d[1:])) > 26 for d in centres):
            centres.append(c)
    radii = rng.uniform(8, 11, count)
    angles = rng.uniform(0, 2 * np.pi, count)
    movie, truth = np.zeros((t, z, h, w), np.float32), np.zeros((t, z, h, w), np.int32)
    for k in range(t):
        vol, lab = rng.normal(300, 30, (z, h, w)).astype(np.float32), np.zeros((z, h, w), np.int32)
        for i, (c, r, a) in enumerate(zip(centres, radii, angles), 1):
            cz = c[0] + 0.3 * k
            cy, cx = c[1] + step * k * np.sin(a), c[2] + step * k * np.cos(a)
            d = np.sqrt(((zz - cz) * 2.5 / r) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2)
            inside = d < 1
            lab[inside] = i
            vol += inside * (1400 + 600 * (1 - d)) * (0.8 + 0.2 * rng.random((z, h, w)))
        movie[k] = ndi.gaussian_filter(vol, (0.5, 1.0, 1.0))
        truth[k] = lab
    return movie.astype(dtype), truth
