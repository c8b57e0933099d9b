"""Take the user guide's screenshots of the real widget on the generated sample data.

    xvfb-run -s "-screen 0 1920x1080x24" .venv/bin/python scripts/make_screenshots.py [--checkpoint FILE]

Without --checkpoint the widget uses the bundled nano model (the default; official
checkpoints cannot be downloaded where the docs are built), so the masks are the
nano model's real output on the sample data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def pump(app, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents()
        time.sleep(0.01)


def wait_idle(app, widget, timeout=600) -> None:
    end = time.time() + timeout
    while widget.is_busy and time.time() < end:
        app.processEvents()
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sam2.model import load_model
    from napari_sam2.sample_data import make_nuclei_3d
    from napari_sam2.widgets.sam2_widget import SAM2Widget

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    data, meta, _ = make_nuclei_3d()[0]
    layer = viewer.add_image(data, **meta)
    widget = SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="SAM 2", area="right")
    app = QApplication.instance()
    loaded = load_model(None, args.checkpoint) if args.checkpoint else None  # the architecture the file holds
    widget.configure(image=layer, loaded_model=loaded)
    widget.start()
    wait_idle(app, widget)
    viewer.dims.current_step = (16, 0, 0)
    pump(app, 1.0)
    viewer.screenshot(str(out / "01-session-started.png"), canvas_only=False)

    widget.points_layer.add(np.array([[16, 71, 79]], float))  # a click in the middle of a nucleus (z, y, x)
    wait_idle(app, widget)
    widget.new_object()
    widget.points_layer.add(np.array([[16, 128, 132]], float))  # a second nucleus
    wait_idle(app, widget)
    pump(app, 0.5)
    viewer.screenshot(str(out / "02-first-click.png"), canvas_only=False)

    widget.propagate("both")
    wait_idle(app, widget)
    viewer.dims.current_step = (10, 0, 0)
    pump(app, 1.0)
    viewer.screenshot(str(out / "03-propagated.png"), canvas_only=False)

    # the object panel: a third nucleus, one object hidden, one selected
    widget.new_object()
    widget.points_layer.add(np.array([[10, 150, 60]], float))
    wait_idle(app, widget)
    widget.propagate("both")  # only the new object runs: the others did not change
    wait_idle(app, widget)
    widget.set_hidden(2, True)
    widget.select_objects([3])
    pump(app, 1.0)
    viewer.screenshot(str(out / "04-objects.png"), canvas_only=False)

    wait_idle(app, widget)
    pump(app, 0.5)
    viewer.close()

    # segment everything in a new viewer: every nucleus found and tracked through the stack
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    layer = viewer.add_image(data, **meta)
    widget = SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="SAM 2", area="right")
    widget.configure(image=layer, loaded_model=loaded)
    widget.start()
    wait_idle(app, widget)
    viewer.dims.current_step = (16, 0, 0)
    widget.segment_everything(whole_stack=True)
    wait_idle(app, widget)
    viewer.dims.current_step = (12, 0, 0)
    pump(app, 1.0)
    viewer.screenshot(str(out / "05-segment-everything.png"), canvas_only=False)
    wait_idle(app, widget)  # let the background prefetch finish before the viewer goes
    pump(app, 0.5)
    viewer.close()

    # a large time-lapse frame of small nuclei: work in the zoomed view, where they keep their detail
    from napari_sam2.sample_data import cells_2d_time

    movie, truth = cells_2d_time((4, 700, 1100), n=90, seed=3, radius=(5, 10), speed=0.8, brightness=(0.4, 1.0))
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    viewer.window.resize(1900, 950)
    layer = viewer.add_image(movie, name="nuclei time-lapse")
    widget = SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="SAM 2", area="right")
    widget.configure(image=layer, loaded_model=loaded, orientations=1)
    widget.start()
    wait_idle(app, widget)
    viewer.camera.center = (0, 330, 560)
    viewer.camera.zoom = viewer.camera.zoom * 4.5  # about 130 x 190 pixels of the frame: nano's 128 px input
    pump(app, 1.0)
    widget.work_in_view()
    region = widget.region
    viewer.dims.current_step = (0, 0, 0)  # clicks on the first frame
    first = True
    for i in [i for i in np.unique(truth[0][region.slices]) if i]:
        ys, xs = np.nonzero(truth[0] == i)
        y, x = ys.mean(), xs.mean()
        if not (region.top + 8 <= y < region.bottom - 8 and region.left + 8 <= x < region.right - 8):
            continue
        if not first:
            widget.new_object()
        first = False
        widget.points_layer.add(np.array([[0, y, x]], float))
        wait_idle(app, widget)
    widget.propagate("forward")
    wait_idle(app, widget)
    viewer.dims.current_step = (3, 0, 0)
    pump(app, 1.0)
    viewer.screenshot(str(out / "06-work-in-this-view.png"), canvas_only=False)
    print("screenshots written to", out)
    wait_idle(app, widget)
    pump(app, 0.5)
    viewer.close()


if __name__ == "__main__":
    main()
