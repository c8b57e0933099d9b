"""Image path benchmark: ours vs Meta's reference on the same random weights, same run.

    .venv/bin/python benchmarks/bench_image.py [--model sam2.1_hiera_tiny] [--size 1024] [--repeat 3]

Prints seconds per image for the image encoder (float32 for both, plus our
bfloat16 mode), prompt-to-mask latency once the embedding is cached, the
ratios, and how well bfloat16 masks agree with float32 ones (IoU).
Needs the reference (``bash scripts/setup.sh --dev``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _reference import build_reference, ours_from_reference  # noqa: E402

from napari_sam2.model import ImagePredictor  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def blobs(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = rng.normal(30, 8, (h, w))
    centres = []
    for _ in range(6):
        cy, cx, r = rng.uniform(60, h - 60), rng.uniform(60, w - 60), rng.uniform(25, 50)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.uniform(100, 200)
        centres.append((cx, cy))
    return np.clip(img, 0, 255).astype(np.uint8), centres


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sam2.1_hiera_tiny")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    ref = build_reference(args.model, seed=0, image_size=args.size)
    ours = ours_from_reference(args.model, ref, image_size=args.size)
    img, centres = blobs(768, 1024)
    pred = ImagePredictor(ours)
    x = pred.prepare_image(img)

    t_ref = timed(lambda: ref.forward_image(x), args.repeat)
    t_ours = timed(lambda: ours.forward_image(x), args.repeat)

    def ours_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours.forward_image(x)

    t_bf16 = timed(ours_bf16, args.repeat)
    print(f"image encoder, {args.model} at {args.size}px, seconds per image (median of {args.repeat}):")
    print(f"  reference float32 {t_ref:.3f}   ours float32 {t_ours:.3f}   ours bfloat16 {t_bf16:.3f}")
    print(f"  speed-up vs reference: float32 x{t_ref / t_ours:.2f}, bfloat16 x{t_ref / t_bf16:.2f}")

    # prompt-to-mask latency with a cached embedding
    pred.set_image(img)
    pt = [list(centres[0])]
    lat_ours = timed(lambda: pred.predict(points=pt, labels=[1]), 50)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_parity_image import RefImagePredictor

    ref_pred = RefImagePredictor(ref, np.repeat(img[..., None], 3, axis=2))
    lat_ref = timed(lambda: ref_pred.predict(points=pt, labels=[1]), 50)
    print(f"prompt-to-mask (1 click, multimask, {img.shape[1]}x{img.shape[0]} output), ms: reference {lat_ref * 1e3:.1f}   ours {lat_ours * 1e3:.1f}")

    # bfloat16 agreement with float32 (mask IoU per prompt)
    fast = ImagePredictor(ours, fast=True)
    fast.set_image(img)
    t_fast_pred = timed(lambda: fast.predict(points=pt, labels=[1]), 20)
    ious = []
    for cx, cy in centres:
        a = pred.predict(points=[[cx, cy]], labels=[1], multimask_output=False).masks[0]
        b = fast.predict(points=[[cx, cy]], labels=[1], multimask_output=False).masks[0]
        union = np.logical_or(a, b).sum()
        ious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
    print(f"bfloat16 prompt-to-mask {t_fast_pred * 1e3:.1f} ms; mask IoU bfloat16 vs float32 over {len(ious)} clicks: "
          f"mean {np.mean(ious):.3f}, min {np.min(ious):.3f} (random weights)")


if __name__ == "__main__":
    main()
