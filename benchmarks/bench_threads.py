"""How propagation slows down when other processes use the cores, by thread setting.

    .venv/bin/python benchmarks/bench_threads.py [--size 256] [--slices 12] [--hogs 0 1 2]

Each configuration runs in a fresh interpreter (OpenMP reads its settings once, when
torch loads): torch's intra-op threads (1 or all cores) and the OpenMP wait policy
(libgomp's default, which spins a while before it sleeps, PASSIVE, or a shorter
spin through GOMP_SPINCOUNT). For each, one
click and a forward propagation through a generated stack (2.1-tiny, random weights)
are timed alone and with 1 or 2 busy-looping processes beside it. Printed: seconds per
configuration and load, and the slowdown against the same configuration alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import numpy as np, torch
size, slices, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
from napari_sam2.model import build_model, get_config
from napari_sam2.model.video import StackSession
from napari_sam2.sample_data import nuclei_3d
torch.manual_seed(0)
m = build_model(get_config("sam2.1_hiera_tiny").with_image_size(size))
with torch.no_grad():
    m.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(8.0)
data, _ = nuclei_3d((slices, 192, 192))
s = StackSession(m, data, intensity_range=(500, 3800))
s.add_points(0, 1, points=[[96, 96]], labels=[1])  # warm-up: encoder and decoder once
t0 = time.perf_counter()
s = StackSession(m, data, intensity_range=(500, 3800))
s.add_points(0, 1, points=[[96, 96]], labels=[1])
for _ in s.propagate("forward"):
    pass
print(json.dumps({"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}))
"""


def hog(stop):
    x = 0
    while not stop.is_set():
        x = (x * 7 + 1) % 1000003


def run(size, slices, threads, policy, hogs):
    env = dict(os.environ)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(k, None)
    env.update(policy or {})
    stop = mp.Event()
    procs = [mp.Process(target=hog, args=(stop,)) for _ in range(hogs)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(slices), str(threads)], env=env,
                             capture_output=True, text=True, check=True)
    finally:
        stop.set()
        for p in procs:
            p.join()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--hogs", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    cores = os.cpu_count()
    fewer = max(1, cores - 1)
    configs = [(0, None, f"torch default ({cores} threads), OpenMP default wait"),
               (0, {"OMP_WAIT_POLICY": "PASSIVE"}, f"{cores} threads, OMP_WAIT_POLICY=PASSIVE"),
               (0, {"GOMP_SPINCOUNT": "10000"}, f"{cores} threads, GOMP_SPINCOUNT=10000"),
               (0, {"GOMP_SPINCOUNT": "1000"}, f"{cores} threads, GOMP_SPINCOUNT=1000"),
               (fewer, None, f"{fewer} thread(s) (cores - 1), OpenMP default wait"),
               (fewer, {"OMP_WAIT_POLICY": "PASSIVE"}, f"{fewer} thread(s) (cores - 1), PASSIVE")]
    print(f"{cores} cores; sam2.1_hiera_tiny at {args.size} px, click + forward through {args.slices} slices")
    print("| setting | " + " | ".join(f"{h} busy process(es)" for h in args.hogs) + " |")
    print("| --- |" + " --- |" * len(args.hogs))
    for threads, policy, name in configs:
        times = [run(args.size, args.slices, threads, policy, h)["seconds"] for h in args.hogs]
        cells = [f"{t:.2f} s" + ("" if i == 0 else f" ({t / times[0]:.1f}x)") for i, t in enumerate(times)]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
