"""What tracking in several orientations costs, interactively (model.ensemble.EnsembleSession).

    .venv/bin/python benchmarks/bench_orientations.py              # bundled nano, CPU
    .venv/bin/python benchmarks/bench_orientations.py --device cuda

On the sample nuclei (32 slices of 192 x 192): the first click on a slice, then one
nucleus propagated both ways through the stack, first with the slices' features still
to compute and again with them cached. Median of --repeats fresh sessions; the ratio is
against 1 orientation (plain SAM 2 tracking) measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from napari_sam2.model import load_model
    from napari_sam2.model.config import NANO
    from napari_sam2.model.ensemble import ORIENTATION_CHOICES, EnsembleSession
    from napari_sam2.model.evaluate import central_pixel
    from napari_sam2.sample_data import nuclei_3d

    model = load_model(NANO.name, device=args.device)
    image, labels = nuclei_3d()
    xy = central_pixel(labels[16] == 7)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def once(n):
        s = EnsembleSession(model, image, orientations=n)
        t0 = time.perf_counter()
        s.add_points(16, 1, points=[xy], labels=[1])
        sync()
        t1 = time.perf_counter()
        for _ in s.propagate("both"):
            pass
        sync()
        t2 = time.perf_counter()
        s.reset()
        s.add_points(16, 1, points=[xy], labels=[1])
        for _ in s.propagate("both"):
            pass
        sync()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    once(8)  # warm-up
    print(f"{NANO.name} on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| orientations | first click | propagate 32 slices | again, features cached | x 1 orientation |")
    print("| --- | --- | --- | --- | --- |")
    base = None
    for n in ORIENTATION_CHOICES:
        runs = np.array([once(n) for _ in range(args.repeats)])
        click, prop, cached = (statistics.median(runs[:, i]) for i in range(3))
        base = base or prop
        print(f"| {n} | {click * 1e3:.0f} ms | {prop:.2f} s | {cached:.2f} s | {prop / base:.1f} |", flush=True)


if __name__ == "__main__":
    main()
