"""Many objects in one session: quality of own anchors vs the reference's scheme vs one at a time.

    .venv/bin/python benchmarks/many_objects_quality.py                     # bundled nano, 1 orientation
    .venv/bin/python benchmarks/many_objects_quality.py --orientations 1 8  # and the 8-orientation ensemble
    .venv/bin/python benchmarks/many_objects_quality.py --seeds 9000 --orientations 1   # a smoke test

On generated nuclei stacks (napari_sam2.sample_data.nuclei_3d, test seeds 9000-9002, which
training never saw), every nucleus gets one positive click at its central pixel
(evaluate.central_pixel) on its click slice: its largest slice by default (--click
largest), or the middle of its z extent (--click middle, the slice
evaluate.click_and_propagate uses). All schemes use the same click slices:

- one at a time: each object alone in a session (reset between objects), propagated both
  ways from its click; with --click middle this is evaluate.click_and_propagate itself;
- together, reference start: all objects clicked in ONE session, propagated both ways with
  propagate(start=the earliest click slice), the reference's semantics (every object
  tracked from that slice, even before its own click);
- together, own anchors: all objects in ONE session, each tracked from its own click slice
  (the engine's default), with stop_after_absent in (None, 1, 2, 3, 5).

Each object's 3D Dice is computed from its own mask in each yielded dict (sessions keep
non_overlap=False): no label image is written, so where two objects claim a voxel both
keep it. Slices computed per object are the slices where it was yielded (its click slice
included); an early stop leaves the rest empty.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

STOPS = (None, 1, 2, 3, 5)


def click_slice(gt: np.ndarray, how: str) -> int:
    present = np.flatnonzero(gt.any(axis=(1, 2)))
    if how == "largest":
        return int(np.argmax(gt.sum(axis=(1, 2))))
    mid = (present[0] + present[-1]) / 2  # as evaluate.click_and_propagate picks it
    return int(present[np.argmin(np.abs(present - mid))])


def collect(stream, ids):
    """Per-object (N, H, W) masks and slice counts from a propagation's (slice, {id: mask}) stream."""
    masks, counts = {}, dict.fromkeys(ids, 0)
    for f, d in stream:
        for i, m in d.items():
            if i not in masks:
                masks[i] = {}
            masks[i][f] = m
            counts[i] += 1
    return masks, counts


def to_volume(by_slice, shape):
    v = np.zeros(shape, bool)
    for f, m in by_slice.items():
        v[f] = m
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[9000, 9001, 9002], help="nuclei_3d seeds")
    ap.add_argument("--orientations", type=int, nargs="+", default=[1],
                    help="orientation counts to run (1: plain SAM 2; 2, 4, 8: EnsembleSession)")
    ap.add_argument("--click", choices=("largest", "middle"), default="largest",
                    help="click slice of every object, in every scheme (default: its largest slice)")
    ap.add_argument("--checkpoint", help="weights file (default: the bundled nano weights)")
    ap.add_argument("--image-size", type=int, help="model input size (default: the model's)")
    ap.add_argument("--fast", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--max-objects", type=int, help="only the first N nuclei of each stack (smoke tests)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()

    from napari_sam2.model.checkpoint import load_model
    from napari_sam2.model.config import DEFAULT_MODEL, ORIENTATION_CHOICES
    from napari_sam2.model.ensemble import open_session
    from napari_sam2.model.evaluate import central_pixel, click_and_propagate, dice
    from napari_sam2.sample_data import nuclei_3d

    for k in args.orientations:
        if k not in ORIENTATION_CHOICES:
            raise SystemExit(f"--orientations: each must be one of {ORIENTATION_CHOICES}, got {k}")
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    model = load_model(DEFAULT_MODEL, args.checkpoint, device="cpu", image_size=args.image_size)
    print(f"{DEFAULT_MODEL} ({args.checkpoint or 'bundled weights'}) at {model.image_size} px"
          f"{', fast (bfloat16)' if args.fast else ''}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"nuclei_3d seeds {args.seeds}; click: central pixel of each object's {args.click} slice", flush=True)

    stacks = []
    for s in args.seeds:
        image, labels = nuclei_3d(seed=s)
        ids = [int(i) for i in np.unique(labels) if i != 0][: args.max_objects]
        gts = {i: labels == i for i in ids}
        clicks = {}
        for i in ids:
            z = click_slice(gts[i], args.click)
            clicks[i] = (z, central_pixel(gts[i][z]))
        stacks.append((s, image, labels, ids, gts, clicks))

    rows = []  # (orientations, scheme, {metric: values})
    for k in args.orientations:
        def session(image):
            return open_session(model, image, orientations=k, fast=args.fast)

        records = {}  # scheme -> per-object values pooled over the stacks

        def add(scheme, seed, dice_3d, computed, gt):
            """One object's result: its Dice and the set of slices computed for it."""
            present = gt.any(axis=(1, 2))
            r = records.setdefault(scheme, {"dice": [], "computed": [], "extent": [], "left_out": [], "outside": [],
                                            "seconds": 0.0, "per_stack": {}})
            r["dice"].append(dice_3d)
            r["per_stack"].setdefault(seed, []).append(dice_3d)
            r["computed"].append(len(computed))
            r["extent"].append(int(present.sum()))
            r["left_out"].append(sum(1 for z in np.flatnonzero(present) if z not in computed))
            r["outside"].append(sum(1 for z in computed if not present[z]))
            return r

        for seed, image, labels, ids, gts, clicks in stacks:
            shape = labels.shape
            # one at a time
            t = time.perf_counter()
            if args.click == "middle":  # the library's own evaluation, which clicks there
                for sc in click_and_propagate(model, image, labels, obj_ids=ids, orientations=k, fast=args.fast):
                    i = sc.obj_id
                    assert (sc.click_slice, tuple(sc.click_xy)) == (clicks[i][0], tuple(clicks[i][1]))
                    r = add("one at a time", seed, sc.dice_3d, set(range(shape[0])), gts[i])  # whole stack, no stop
            else:
                sess = session(image)
                for i in ids:
                    z, xy = clicks[i]
                    sess.reset()
                    sess.add_points(z, 1, points=[xy], labels=[1])
                    masks, _ = collect(sess.propagate("both", start=z), [1])
                    m = masks.get(1, {})
                    r = add("one at a time", seed, dice(to_volume(m, shape), gts[i]), set(m), gts[i])
            r["seconds"] += time.perf_counter() - t

            # together: the reference's start, and own anchors with each stop setting
            for scheme, kwargs in [("together, reference start", {"start": min(z for z, _ in clicks.values())})] + [
                (f"together, own anchors, stop {stop}", {"stop_after_absent": stop}) for stop in STOPS
            ]:
                t = time.perf_counter()
                sess = session(image)
                for i in ids:
                    z, xy = clicks[i]
                    sess.add_points(z, i, points=[xy], labels=[1])
                masks, _ = collect(sess.propagate("both", **kwargs), ids)
                dt = time.perf_counter() - t
                for i in ids:
                    m = masks.get(i, {})
                    r = add(scheme, seed, dice(to_volume(m, shape), gts[i]), set(m), gts[i])
                r["seconds"] += dt
            print(f"  {k} orientation(s), seed {seed}: {len(ids)} objects done ({time.perf_counter() - t_all:.0f} s)",
                  flush=True)

        for scheme, r in records.items():
            rows.append((k, scheme, r))

    n_obj = sum(len(s[3]) for s in stacks)
    depth = stacks[0][2].shape[0]
    print()
    print(f"Many objects in one session, {DEFAULT_MODEL}, nuclei_3d seeds {', '.join(map(str, args.seeds))} "
          f"({n_obj} nuclei, {depth} slices each), one click per nucleus at the central pixel of its {args.click} "
          f"slice, the same click in every scheme. Per-object 3D Dice from each object's own masks (no label image, "
          f"overlaps kept). Slices computed: where the object was yielded, its click slice included.")
    print()
    print("| orientations | scheme | mean 3D Dice | per stack | slices computed / object | true z extent / object "
          "| extent slices left out / object | slices computed outside the extent / object | seconds |")
    print("| --- " * 9 + "|")
    for k, scheme, r in rows:
        per_stack = ", ".join(f"{np.mean(v):.3f}" for v in r["per_stack"].values())
        print(f"| {k} | {scheme} | {np.mean(r['dice']):.4f} | {per_stack} | {np.mean(r['computed']):.1f} "
              f"| {np.mean(r['extent']):.1f} | {np.mean(r['left_out']):.2f} | {np.mean(r['outside']):.1f} "
              f"| {r['seconds']:.0f} |")
    print()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}; total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
