"""End-to-end quality of the nano model on generated stacks that training never saw.

    .venv/bin/python benchmarks/nano_quality.py                      # the bundled weights
    .venv/bin/python benchmarks/nano_quality.py --checkpoint runs/nano/stage6/weights.pt --all
    .venv/bin/python benchmarks/nano_quality.py --checkpoint runs/nano/stage12/weights.pt --image-size 192 \
        --seeds 5000 5001 5002 5003 5004 5005                        # a validation figure

As a user works: one positive click at the most interior pixel of each object's middle
slice, propagated both ways through the whole stack (napari_sam2.model.evaluate).
Prints the mean per-object 3D Dice per set, the Dice by distance from the clicked slice
(a markdown table for docs/benchmarks.md) and the slices where an absent object was
still predicted. --all adds seam-free nuclei, 2D+t cells and random_stack draws.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from napari_sam2.model.config import ORIENTATION_CHOICES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="weights file (default: the bundled nano weights)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[9000, 9001, 9002], help="nuclei_3d seeds")
    ap.add_argument("--all", action="store_true", help="also seam-free nuclei, cells_2d_time and random_stack")
    ap.add_argument("--image-size", type=int, help="model input size (default: the nano config's, 128)")
    ap.add_argument("--orientations", type=int, default=1, choices=ORIENTATION_CHOICES,
                    help="track in this many orientations and average (model.ensemble; default 1: plain SAM 2)")
    args = ap.parse_args()

    from napari_sam2.model.checkpoint import load_model
    from napari_sam2.model.config import NANO
    from napari_sam2.model.evaluate import (
        click_and_propagate,
        error_shares,
        slice_table,
    )
    from napari_sam2.sample_data import cells_2d_time, nuclei_3d, random_stack

    model = load_model(NANO.name, args.checkpoint, device="cpu", image_size=args.image_size)
    print(f"{NANO.name} ({args.checkpoint or 'bundled'}), {args.orientations} orientation(s), torch {torch.__version__}, {torch.get_num_threads()} threads")

    def run(name, stacks):
        t = time.perf_counter()
        scores, per_stack = [], []
        for image, labels in stacks:
            s = click_and_propagate(model, image, labels, orientations=args.orientations)
            scores += s
            per_stack.append(np.mean([x.dice_3d for x in s]))
        print(
            f"{name}: mean 3D Dice {np.mean([x.dice_3d for x in scores]):.3f} over {len(scores)} objects "
            f"(per stack {', '.join(f'{p:.3f}' for p in per_stack)}); "
            f"{np.mean([x.false_slices for x in scores]):.1f} slices per object predicted where it is absent; "
            "wrong voxels: " + ", ".join(f"{v:.0%} {k}" for k, v in error_shares(scores).items()) + "; "
            f"{time.perf_counter() - t:.0f} s",
            flush=True,
        )
        return scores

    seeds = args.seeds
    scores = run(f"nuclei_3d seeds {seeds[0]}-{seeds[-1]}", [nuclei_3d(seed=s) for s in seeds])
    rows = slice_table(scores)
    print("| slices from the click | " + " | ".join(str(r[0]) for r in rows) + " |")
    print("| --- " * (len(rows) + 1) + "|")
    print("| mean Dice | " + " | ".join(f"{r[1]:.2f}" for r in rows) + " |")
    print("| slices | " + " | ".join(str(r[2]) for r in rows) + " |")
    worst = sorted(scores, key=lambda x: x.dice_3d)[:5]
    print("worst objects (label id: 3D Dice):", ", ".join(f"{x.obj_id}: {x.dice_3d:.2f}" for x in worst))
    if args.all:
        run("nuclei_3d without seams", [nuclei_3d(seed=s, seam=0.0) for s in seeds])
        run("cells_2d_time seeds 9100-9102", [cells_2d_time(seed=s) for s in (9100, 9101, 9102)])
        run("random_stack seeds 9100-9105", [random_stack(s) for s in range(9100, 9106)])


if __name__ == "__main__":
    main()
