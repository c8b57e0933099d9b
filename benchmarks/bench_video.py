"""Stack propagation benchmark: ours vs Meta's reference video predictor, same weights, same run.

    .venv/bin/python benchmarks/bench_video.py speed  [--size 1024] [--frames 10]
    .venv/bin/python benchmarks/bench_video.py memory [--size 256] [--slices 50 200 1000]

speed: seconds per slice for sam2.1_hiera_tiny with 1 and 3 objects once the
memory bank is full (slices >= 7), reference float32 vs ours float32 and
bfloat16, plus the bfloat16 masks' IoU with float32 ones.
memory: peak resident memory of a whole propagation (1 object) over stacks of
512x512 slices, each run in a fresh process; the model runs at a reduced
input size (--size) to keep the long stacks short.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_stack(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    frames = np.empty((n, size, size), np.uint8)
    for t in range(n):
        img = rng.normal(50, 12, (size, size))
        for k, (cy, cx) in enumerate(((0.3, 0.3), (0.6, 0.65), (0.7, 0.25))):
            y = (cy + 0.004 * t * (1 - 2 * (k % 2))) * size
            x = (cx + 0.003 * t) * size
            img[(yy - y) ** 2 + (xx - x) ** 2 < (0.08 * size) ** 2] += 120
        frames[t] = np.clip(img, 0, 255)
    return frames


CLICKS = ((0.3, 0.3), (0.65, 0.6), (0.25, 0.7))  # (x, y) fractions, one per object


def write_jpegs(frames: np.ndarray, folder: Path) -> np.ndarray:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i}.jpg", quality=95)
        out.append(np.array(Image.open(folder / f"{i}.jpg").convert("RGB")))
    return np.stack(out)


def speed(args) -> None:
    from _reference import build_reference, ours_from_reference

    from napari_sam2.model.video import StackSession

    torch.set_grad_enabled(False)
    s, n = args.size, args.frames
    tmp = Path(tempfile.mkdtemp())
    decoded = write_jpegs(make_stack(n, s), tmp / "jpg")
    ref = build_reference("sam2.1_hiera_tiny", seed=0, image_size=s, video=True)
    ours = ours_from_reference("sam2.1_hiera_tiny", ref, image_size=s)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"sam2.1_hiera_tiny at {s}px, {n} slices, clicks on slice 0, timing slices 7..{n - 1}")

    def run_ref(n_obj):
        state = ref.init_state(str(tmp / "jpg"))
        for k in range(n_obj):
            ref.add_new_points_or_box(state, 0, k + 1, points=[[CLICKS[k][0] * s, CLICKS[k][1] * s]], labels=[1])
        times, t0 = {}, time.perf_counter()
        for f, _, _ in ref.propagate_in_video(state):
            times[f] = time.perf_counter() - t0
            t0 = time.perf_counter()
        return times

    def run_ours(n_obj, fast):
        sess = StackSession(ours, decoded, fill_hole_area=0, fast=fast, feature_cache_mb=64)
        for k in range(n_obj):
            sess.add_points(0, k + 1, points=[[CLICKS[k][0] * s, CLICKS[k][1] * s]], labels=[1])
        times, masks, t0 = {}, {}, time.perf_counter()
        for f, m in sess.propagate("forward"):
            times[f] = time.perf_counter() - t0
            masks[f] = m
            t0 = time.perf_counter()
        return times, masks

    results = {}
    for n_obj in args.objects:
        r = run_ref(n_obj)
        o32, m32 = run_ours(n_obj, False)
        o16, m16 = run_ours(n_obj, True)
        per = {k: float(np.mean([t[f] for f in range(7, n)])) for k, t in (("ref", r), ("f32", o32), ("bf16", o16))}
        ious = []
        for f in range(1, n):
            for oid in m32[f]:
                a, b = m32[f][oid], m16[f][oid]
                u = np.logical_or(a, b).sum()
                ious.append(1.0 if u == 0 else np.logical_and(a, b).sum() / u)
        results[n_obj] = per
        print(f"{n_obj} object(s): s/slice reference {per['ref']:.2f}  ours float32 {per['f32']:.2f} "
              f"(x{per['ref'] / per['f32']:.2f})  ours bfloat16 {per['bf16']:.2f} (x{per['ref'] / per['bf16']:.2f}); "
              f"bfloat16 vs float32 mask IoU mean {np.mean(ious):.3f} min {np.min(ious):.3f}")


def _memory_child(impl: str, n: int, size: int, folder: str) -> None:
    torch.set_grad_enabled(False)
    if impl == "reference":
        from _reference import build_reference

        ref = build_reference("sam2.1_hiera_tiny", seed=0, image_size=size, video=True)
    else:
        from napari_sam2.model import build_model, get_config

        torch.manual_seed(0)
        model = build_model(get_config("sam2.1_hiera_tiny").with_image_size(size))
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.data.fill_(8.0)
    base = _vm_hwm_mib()
    t0 = time.perf_counter()
    if impl == "reference":
        state = ref.init_state(folder)
        ref.add_new_points_or_box(state, 0, 1, points=[[150, 150]], labels=[1])
        for _ in ref.propagate_in_video(state):
            pass
    else:
        from napari_sam2.io import TiffStack
        from napari_sam2.model.video import StackSession

        frames = TiffStack(os.path.join(folder, "stack.tif"))  # read page by page from disk
        sess = StackSession(model, frames, intensity_range=(0, 255), fill_hole_area=0, feature_cache_mb=64)
        sess.add_points(0, 1, points=[[150, 150]], labels=[1])
        labels = np.zeros(frames.shape, np.uint8)  # what a caller keeps: the masks
        for f, m in sess.propagate("forward"):
            labels[f][m[1]] = 1
    print(json.dumps({"peak_mib": _vm_hwm_mib(), "after_model_mib": base, "seconds": time.perf_counter() - t0}))


def _vm_hwm_mib() -> float:
    """This process's peak resident memory (VmHWM). Unlike ru_maxrss, which Linux
    carries over from the parent across exec, it counts only this program."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory(args) -> None:
    import tifffile

    tmp = Path(tempfile.mkdtemp())
    print(f"peak RSS of a whole forward propagation, 1 object, 512x512 slices, model input {args.size}px "
          f"(sam2.1_hiera_tiny, random weights); ours reads a TIFF lazily, the reference a JPEG folder")
    print("slices | reference MiB | ours MiB (ours keeps a uint8 label volume) | reference s | ours s")
    for n in args.slices:
        folder = tmp / f"s{n}"
        frames = write_jpegs(make_stack(n, 512), folder)[..., 0]
        tifffile.imwrite(folder / "stack.tif", frames)
        del frames
        row = {}
        for impl in ("reference", "ours"):
            cmd = [sys.executable, __file__, "_child", impl, str(n), str(args.size), str(folder)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            row[impl] = json.loads(out)
        print(f"{n:6d} | {row['reference']['peak_mib']:13.0f} | {row['ours']['peak_mib']:8.0f} | "
              f"{row['reference']['seconds']:11.0f} | {row['ours']['seconds']:6.0f}", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--size", type=int, default=1024)
    sp.add_argument("--frames", type=int, default=10)
    sp.add_argument("--objects", type=int, nargs="+", default=[1, 3])
    mp = sub.add_parser("memory")
    mp.add_argument("--size", type=int, default=256)
    mp.add_argument("--slices", type=int, nargs="+", default=[50, 200, 1000])
    args = ap.parse_args()
    speed(args) if args.what == "speed" else memory(args)


if __name__ == "__main__":
    main()
