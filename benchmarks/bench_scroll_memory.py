"""Resident memory while the viewer scrolls a fixed axis (T of a T-Z-Y-X movie) with prefetch.

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python benchmarks/bench_scroll_memory.py [--timepoints 50]

A session is started on a generated T-Z-Y-X movie, propagating along Z; then the T
slider moves through every time point, waiting at each for the widget's background
prefetch (the slice on screen and its neighbours) to finish. Printed: resident memory
(RSS) after the session started and every 10 time points.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timepoints", type=int, default=50)
    ap.add_argument("--size", type=int, default=512, help="model input size")
    args = ap.parse_args()

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_sam2.model import build_model, get_config
    from napari_sam2.widgets.sam2_widget import SAM2Widget

    rng = np.random.default_rng(0)
    movie = rng.integers(0, 4000, (args.timepoints, 8, 96, 96)).astype(np.uint16)
    viewer = napari.Viewer(show=True)
    layer = viewer.add_image(movie, contrast_limits=(0, 4000))
    widget = SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget)
    app = QApplication.instance()
    torch.manual_seed(0)
    model = build_model(get_config("sam2.1_hiera_tiny").with_image_size(args.size))

    def idle():
        while widget.is_busy:
            app.processEvents()
            time.sleep(0.005)
        app.processEvents()

    widget.configure(image=layer, loaded_model=model, orientations=1, axis=1)
    widget.start()
    idle()
    print(f"sam2.1_hiera_tiny at {args.size} px; movie {movie.shape} (T Z Y X), propagating along Z")
    print(f"after start: {rss_mib():.0f} MiB")
    for t in range(args.timepoints):
        viewer.dims.current_step = (t, 4, 0, 0)
        idle()
        if (t + 1) % 10 == 0:
            print(f"after {t + 1} time points: {rss_mib():.0f} MiB", flush=True)
    viewer.close()


if __name__ == "__main__":
    main()
