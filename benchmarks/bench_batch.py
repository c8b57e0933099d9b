"""Files per minute of ``napari-sam2 batch`` with 1 and 2 dask worker processes.

    .venv/bin/python benchmarks/bench_batch.py                 # 8 generated stacks, nano, clicks CSVs
    .venv/bin/python benchmarks/bench_batch.py --stacks 16 --kind auto

Each generated nuclei stack (24 x 192 x 192) gets a clicks CSV with one click at the
central pixel of every nucleus on its largest slice (or ``--kind auto``: segment
everything). The same batch runs three ways in one run, each into a fresh folder:
here in this process (torch's 2 threads), on a LocalCluster of 1 worker process with 2
torch threads, and on a LocalCluster of 2 worker processes with 1 torch thread each.
Cluster start-up (processes, imports, model load) is timed apart from the stacks. The
in-process run loads the model inside its time (about a second).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def make_inputs(folder: Path, n: int) -> None:
    import tifffile

    from napari_sam2.model.evaluate import central_pixel
    from napari_sam2.sample_data import nuclei_3d

    for k in range(n):
        image, labels = nuclei_3d((24, 192, 192), n=10, seed=7000 + k)
        tifffile.imwrite(folder / f"stack{k:02d}.tif", image)
        rows = ["slice,y,x,object,positive"]
        for obj in [int(v) for v in np.unique(labels) if v]:
            areas = (labels == obj).sum((1, 2))
            z = int(np.argmax(areas))
            y, x = central_pixel(labels[z] == obj)
            rows.append(f"{z},{y},{x},{obj},1")
        (folder / f"stack{k:02d}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stacks", type=int, default=8)
    ap.add_argument("--kind", choices=["points", "auto"], default="points")
    args = ap.parse_args()

    import torch
    from distributed import Client, LocalCluster

    from napari_sam2.batch import (
        BatchSettings,
        plan_batch,
        register_model_plugin,
        run_batch,
    )

    root = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    (root / "in").mkdir()
    make_inputs(root / "in", args.stacks)
    print(f"{args.stacks} stacks of 24 x 192 x 192, {args.kind}, nano, torch {torch.__version__}")
    rows = []

    def timed(name, settings, **where):
        items = plan_batch([str(root / "in" / "*.tif")], root / name, args.kind)
        t = time.perf_counter()
        results = run_batch(items, settings, **where)
        dt = time.perf_counter() - t
        assert all(r.status == "done" for r in results), [r.error for r in results if r.error]
        rows.append((name, dt, 60 * len(items) / dt))
        print(f"{name}: {dt:.1f} s, {60 * len(items) / dt:.1f} files per minute", flush=True)

    timed("here, 2 threads", BatchSettings())
    for workers, threads in ((1, 2), (2, 1)):
        t = time.perf_counter()
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(workers)
            settings = BatchSettings(threads=threads)
            register_model_plugin(client, settings)  # imports + model on each worker, before the clock
            start = time.perf_counter() - t
            timed(f"{workers} worker(s) x {threads} thread(s)", settings, client=client)
            print(f"  (cluster start, imports and model load {start:.1f} s, not counted)")
    base = rows[0][2]
    print("\n| where | seconds | files per minute | vs here |\n| --- | --- | --- | --- |")
    for name, dt, fpm in rows:
        print(f"| {name} | {dt:.1f} | {fpm:.1f} | x{fpm / base:.2f} |")


if __name__ == "__main__":
    main()
