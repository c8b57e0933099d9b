"""Train the bundled nano model on generated stacks, then export its weights.

    .venv/bin/python scripts/train_nano.py --out runs/nano            # train (CPU: about an hour)
    .venv/bin/python scripts/train_nano.py --out runs/nano --resume   # continue an interrupted run
    .venv/bin/python scripts/train_nano.py --out runs/nano --export   # write the package's weights file

Training stacks use seeds 1000.., validation stacks 5000..; the quality test
and benchmark use other seeds (9000..), which training never sees.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from napari_sam2.model.train import TrainConfig, prepare_stack, train
from napari_sam2.sample_data import random_stack

TRAIN_SEEDS = range(1000, 1096)
VAL_SEEDS = range(5000, 5012)

NANO_RECIPE = TrainConfig(
    model="sam2.1_nano_synthetic",
    init="scratch",
    clip_length=8,
    clips_per_step=2,
    objects_per_clip=3,
    epochs=13,
    steps_per_epoch=200,
    lr=1e-3,
    warmup_steps=100,
    val_clips=16,
    seed=0,
)


def make_stacks(seeds, size):
    return [prepare_stack(*random_stack(s), size, name=f"seed {s}") for s in seeds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/nano")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--epochs", type=int, default=NANO_RECIPE.epochs)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--export", action="store_true", help="only export OUT/weights.pt into the package")
    args = ap.parse_args()
    if args.export:
        from napari_sam2.model.checkpoint import export_bundled

        path, digest = export_bundled(Path(args.out) / "weights.pt")
        print(f"wrote {path}\nsha256 {digest}\n(put this sum into BUNDLED in model/checkpoint.py)")
        return
    cfg = NANO_RECIPE.replace(epochs=args.epochs, device=args.device)
    size = 256
    t = time.perf_counter()
    tr, va = make_stacks(TRAIN_SEEDS, size), make_stacks(VAL_SEEDS, size)
    print(f"generated {len(tr)} training and {len(va)} validation stacks in {time.perf_counter() - t:.0f} s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    train(cfg, tr, args.out, val_stacks=va, resume=args.resume)


if __name__ == "__main__":
    main()
