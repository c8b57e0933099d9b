"""Automatic masks on one 2D image: ours against Meta's SAM2AutomaticMaskGenerator, same run.

    .venv/bin/python benchmarks/bench_automatic.py [--size 1024] [--points 32] [--repeats 1]

2.1-tiny with identical random weights (its mask head scaled so that masks pass the
filters), a generated 512 x 512 RGB image of bright discs, float32 on the CPU. Meta's
generator needs torchvision, which does not work here: the tests' torch-only stand-in
(tests/_torchvision_standin.py) provides it. Printed: seconds per image for each, masks
found, and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="model input (Meta's predictor supports 1024 only)")
    ap.add_argument("--points", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from _reference import build_reference, ours_from_reference
    from _torchvision_standin import install

    install()
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from napari_sam2.model.automatic import AutomaticMaskGenerator

    ref = build_reference("sam2.1_hiera_tiny", seed=0, image_size=args.size)
    with torch.no_grad():
        for mlp in ref.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(20.0)
            mlp.layers[-1].bias.mul_(20.0)
    ours = ours_from_reference("sam2.1_hiera_tiny", ref, image_size=args.size)
    rng = np.random.default_rng(0)
    h = w = 512
    yy, xx = np.mgrid[0:h, 0:w]
    img = rng.normal(40, 10, (h, w, 3))
    for _ in range(40):
        cy, cx, r = rng.uniform(20, h - 20), rng.uniform(20, w - 20), rng.uniform(8, 25)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] += rng.uniform(80, 180, 3)
    img = np.clip(img, 0, 255).astype(np.uint8)
    kw = {"points_per_side": args.points, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.45}
    if args.size != 1024:
        raise SystemExit("Meta's image predictor assumes a 1024 px input: use --size 1024")
    theirs = SAM2AutomaticMaskGenerator(ref, **kw)
    s = args.size
    mine = AutomaticMaskGenerator(ours, **kw)
    print(f"2.1-tiny at {s} px, {args.points}x{args.points} points, image {h}x{w}, threads {torch.get_num_threads()}")
    times = {"Meta": [], "ours": []}
    counts = {}
    for _ in range(args.repeats):
        for name, fn in (("Meta", lambda: theirs.generate(img)), ("ours", lambda: mine.generate(img))):
            t0 = time.perf_counter()
            counts[name] = len(fn())
            times[name].append(time.perf_counter() - t0)
    for name, seconds in times.items():
        print(f"{name:5s}: {min(seconds):7.2f} s per image, {counts[name]} masks")
    print(f"ratio Meta / ours: {min(times['Meta']) / min(times['ours']):.2f}x")


if __name__ == "__main__":
    main()
