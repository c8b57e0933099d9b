"""Does the viewer stay responsive while the widget propagates? Measures the Qt event loop.

    xvfb-run -s "-screen 0 1920x1080x24" .venv/bin/python benchmarks/bench_responsiveness.py [--size 512] [--slices 20]

A 10 ms QTimer ticks on the GUI thread during a real threaded propagation (the
widget's own thread workers, masks written slice by slice into the Labels
layer). Reported: how many ticks arrived, the gaps between them (median, 99th
percentile, maximum), and the same with no work running, as the baseline.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def measure(app, seconds_or_until, interval_ms=10):
    from qtpy.QtCore import QTimer

    stamps = []
    timer = QTimer()
    timer.setInterval(interval_ms)
    timer.timeout.connect(lambda: stamps.append(time.perf_counter()))
    timer.start()
    t0 = time.perf_counter()
    until = seconds_or_until if callable(seconds_or_until) else (lambda: time.perf_counter() - t0 > seconds_or_until)
    while not until():
        app.processEvents()
        time.sleep(0.001)
    timer.stop()
    gaps = np.diff(stamps) * 1e3 if len(stamps) > 1 else np.array([np.nan])
    return time.perf_counter() - t0, gaps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512, help="model input size")
    ap.add_argument("--slices", type=int, default=20)
    args = ap.parse_args()

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_sam2.model import build_model, get_config
    from napari_sam2.sample_data import nuclei_3d
    from napari_sam2.widgets.sam2_widget import SAM2Widget

    viewer = napari.Viewer(show=True)
    data, _ = nuclei_3d((args.slices, 192, 192))
    layer = viewer.add_image(data, contrast_limits=(500, 3800))
    widget = SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget)
    app = QApplication.instance()
    torch.manual_seed(0)
    model = build_model(get_config("sam2.1_hiera_tiny").with_image_size(args.size))
    model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.data.fill_(8.0)
    widget.configure(image=layer, loaded_model=model, orientations=1)
    widget.start()
    measure(app, lambda: not widget.is_busy and widget.session_started)
    viewer.dims.current_step = (0, 0, 0)
    widget.points_layer.add(np.array([[0, 96, 96]], float))
    measure(app, lambda: not widget.is_busy)

    _, idle = measure(app, 3.0)
    widget.propagate("forward")
    wall, busy = measure(app, lambda: not widget.is_busy)
    done = sum(bool(widget.labels_layer.data[z].any()) for z in range(args.slices))
    print(f"sam2.1_hiera_tiny at {args.size}px, {args.slices} slices of 192x192, 10 ms timer on the GUI thread")
    print(f"idle:        {len(idle) + 1} ticks in 3.0 s; gap median {np.median(idle):.1f} ms, p99 {np.percentile(idle, 99):.1f} ms, max {idle.max():.1f} ms")
    print(f"propagating: {len(busy) + 1} ticks in {wall:.1f} s ({done} slices written); gap median {np.median(busy):.1f} ms, "
          f"p99 {np.percentile(busy, 99):.1f} ms, max {busy.max():.1f} ms")
    viewer.close()


if __name__ == "__main__":
    main()
