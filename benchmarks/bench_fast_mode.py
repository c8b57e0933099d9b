"""Fast mode (bfloat16) against float32, per model, on this machine.

    .venv/bin/python benchmarks/bench_fast_mode.py [--models NAME ...] [--slices 6] [--device cpu]

For each model (random weights at the model's own input size; the nano model at its
128 px): one click on a generated nuclei stack and a forward propagation through
``--slices`` slices, timed in float32 and in bfloat16 in the same run, after a warm-up
of each. Printed: seconds per slice in each mode, the speed-up (float32 / bfloat16),
and what the widget's default (``devices.default_fast``) chooses for that model here.
"""

from __future__ import annotations

import argparse
import time

import torch

from napari_sam2.model import build_model, get_config
from napari_sam2.model.config import NANO
from napari_sam2.model.devices import default_fast, pick_device, supports_bfloat16
from napari_sam2.model.video import StackSession
from napari_sam2.sample_data import nuclei_3d

DEFAULT_MODELS = [NANO.name, "sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus"]


def per_slice(model, data, fast: bool, device) -> float:
    def run():
        s = StackSession(model, data, intensity_range=(500, 3800), fast=fast)
        s.add_points(0, 1, points=[[96, 96]], labels=[1])
        for _ in s.propagate("forward"):
            pass

    run_one = StackSession(model, data[:2], intensity_range=(500, 3800), fast=fast)  # warm-up
    run_one.add_points(0, 1, points=[[96, 96]], labels=[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = pick_device(args.device)
    print(f"device {device}; native bfloat16: {supports_bfloat16(device)}; threads {torch.get_num_threads()}")
    data, _ = nuclei_3d((args.slices, 192, 192))
    print(f"{'model':28s} {'input':>6s} {'f32 s/slice':>12s} {'bf16 s/slice':>13s} {'speed-up':>9s} {'default':>8s}")
    for name in args.models:
        cfg = get_config(name)
        torch.manual_seed(0)
        model = build_model(cfg).to(device).eval()
        with torch.no_grad():
            model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(8.0)
        f32 = per_slice(model, data, False, device)
        bf16 = per_slice(model, data, True, device)
        on = "fast" if default_fast(cfg.image_size, device) else "f32"
        print(f"{name:28s} {cfg.image_size:6d} {f32:12.3f} {bf16:13.3f} {f32 / bf16:8.2f}x {on:>8s}", flush=True)
        del model


if __name__ == "__main__":
    main()
