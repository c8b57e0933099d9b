"""Reopening a stack with and without its embedding store: time to the first mask.

    .venv/bin/python benchmarks/bench_store.py                  # 2.1-tiny, 1024 px, 100 slices
    .venv/bin/python benchmarks/bench_store.py --slices 20      # quicker

2.1-tiny with seeded random weights at its 1024 px input; a generated nuclei stack of
``--slices`` slices (192 x 192, resized to 1024 by the model). Builds the store once
(timed: the encoder on every slice, as ``napari-sam2 embed`` does), then "reopens" the
stack three times each way: a new FrameSource and session, one click on the middle slice,
its mask. Without the store the click waits for the encoder; with it, for one chunk read.
Also a 5-slice propagation from the click, both ways.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from napari_sam2.model import build_model, get_config
    from napari_sam2.model.frames import FrameSource
    from napari_sam2.model.video import StackSession
    from napari_sam2.sample_data import nuclei_3d
    from napari_sam2.store import build_store, open_store

    torch.manual_seed(0)
    model = build_model(get_config("sam2.1_hiera_tiny"))
    image, labels = nuclei_3d((args.slices, 192, 192), n=12, seed=4)
    mid = args.slices // 2
    ys, xs = (labels[mid] > 0).nonzero()
    click = [[float(xs[len(xs) // 2]), float(ys[len(ys) // 2])]]
    folder = Path(tempfile.mkdtemp(prefix="bench-store-"))
    print(f"2.1-tiny 1024 px, {args.slices} slices, torch {torch.__version__}, {torch.get_num_threads()} threads")
    t = time.perf_counter()
    path = build_store(folder / "stack.sam2.zarr", model, FrameSource(image))
    build = time.perf_counter() - t
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"store built in {build:.1f} s ({build / args.slices:.2f} s per slice), {size / 2**20:.0f} MiB on disk")

    def reopen(with_store: bool):
        t0 = time.perf_counter()
        frames = FrameSource(image)
        features = open_store(path, model, frames).features if with_store else None
        session = StackSession(model, frames, compute_features=features)
        session.add_points(mid, 1, points=click, labels=[1])
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in session.propagate("both", frame_range=(max(mid - 2, 0), min(mid + 2, args.slices - 1))):
            pass
        return first, time.perf_counter() - t1

    rows = {}
    for with_store in (False, True):
        runs = [reopen(with_store) for _ in range(args.repeats)]
        rows[with_store] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
    print("\n| reopen | first mask | 5-slice propagation |\n| --- | --- | --- |")
    for with_store, name in ((False, "without the store"), (True, "with the store")):
        first, prop = rows[with_store]
        print(f"| {name} | {first:.2f} s | {prop:.2f} s |")
    print(f"| ratio | x{rows[False][0] / rows[True][0]:.1f} | x{rows[False][1] / rows[True][1]:.1f} |")
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
