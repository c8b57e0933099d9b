"""Training speed: clips per second of the training step (forward, backward, optimiser).

    .venv/bin/python benchmarks/bench_train.py                       # nano, CPU
    .venv/bin/python benchmarks/bench_train.py --model sam2.1_hiera_tiny --image-size 512 --steps 3
    .venv/bin/python benchmarks/bench_train.py --device cuda         # where a GPU exists

A clip is `--clip-length` consecutive slices with up to 3 objects; a step
trains on `--clips` clips. Meta's sam2 package has no training code, so there
is no reference to compare against: the figure is absolute.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from napari_sam2.model.config import NANO, get_config
from napari_sam2.sample_data import random_stack
from napari_sam2.training import TrainConfig, Trainer, prepare_stack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=NANO.name)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--clip-length", type=int, default=8)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    size = args.image_size or get_config(args.model).image_size
    stacks = [prepare_stack(*random_stack(s), size) for s in range(1000, 1006)]
    cfg = TrainConfig(
        model=args.model, image_size=args.image_size, clip_length=args.clip_length, clips_per_step=args.clips,
        steps_per_epoch=args.steps + 2, epochs=1, device=args.device, bf16=args.bf16,
    )
    trainer = Trainer(cfg, stacks, [], tempfile.mkdtemp())
    times = []
    for i in range(args.steps + 2):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.train_step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    steady = times[2:]  # the first steps warm up allocators and kernels
    per_step = float(np.median(steady))
    n_params = sum(p.numel() for p in trainer.model.parameters()) / 1e6
    print(f"model {args.model} ({n_params:.2f} M parameters) at {size} px, device {args.device}, "
          f"{torch.get_num_threads()} threads, bf16 {args.bf16}")
    print(f"{args.clips} clips x {args.clip_length} slices per step, {args.steps} steps measured")
    print(f"median step {per_step:.3f} s  ->  {args.clips / per_step:.2f} clips/s "
          f"({args.clips * args.clip_length / per_step:.1f} slices/s)")


if __name__ == "__main__":
    main()
