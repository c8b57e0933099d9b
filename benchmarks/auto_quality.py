"""Segment everything in generated stacks: the bundled nano model against a classical pipeline.

    .venv/bin/python benchmarks/auto_quality.py               # test seeds, as in docs/benchmarks.md
    .venv/bin/python benchmarks/auto_quality.py --tune        # the classical pipeline's grid on training seeds

Data: generated nuclei z-stacks (``nuclei_3d`` and ``random_stack(kind="nuclei")``) and
cell time-lapses (``cells_2d_time`` and ``random_stack(kind="cells")``) drawn from test
seeds (nuclei 9000.., cells 9100..) that the nano model never trained on (training used
1000.., validation 5000..).

Methods, each on every stack:
- ``napari_sam2.model.auto_stack.segment_stack`` with the bundled nano model and its
  defaults (proposals on the middle slice, new objects searched every 4 slices);
- the classical pipeline (scikit-image): Gaussian smoothing, Otsu threshold, distance
  transform, peaks at least ``min_distance`` apart, watershed, in 3D (a time-lapse as
  T-Y-X, time counting as a dimension so that cells keep one label while they overlap
  from frame to frame). Its parameters (sigma, min_distance, the threshold factor) are
  chosen by ``--tune`` on training seeds 1000.. and then fixed below.

Scores: 3D objects matched one-to-one (Hungarian on IoU); object-level F1 at IoU 0.5 and
the mean IoU of the matched pairs (pairs at IoU >= 0.5). Seconds per stack.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

#: chosen by --tune on training seeds (see the module's doc)
CLASSICAL = {"nuclei": {"sigma": 1.0, "min_distance": 10, "factor": 1.0}, "cells": {"sigma": 1.0, "min_distance": 14, "factor": 1.0}}


def stacks(kind: str, seeds):
    from napari_sam2.sample_data import cells_2d_time, nuclei_3d, random_stack

    for s in seeds:
        if kind == "nuclei":
            yield f"nuclei_3d({s})", *nuclei_3d(seed=s)
            yield f"random_stack({s}, nuclei)", *random_stack(s, kind="nuclei")
        else:
            yield f"cells_2d_time({s})", *cells_2d_time(seed=s)
            yield f"random_stack({s}, cells)", *random_stack(s, kind="cells")


def match(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5):
    """(F1 at IoU >= threshold, mean IoU of the matched pairs, true positives, predicted, true)."""
    from scipy.optimize import linear_sum_assignment

    p_ids, p_inv = np.unique(pred, return_inverse=True)
    g_ids, g_inv = np.unique(gt, return_inverse=True)
    inter = np.bincount(g_inv.ravel() * len(p_ids) + p_inv.ravel(), minlength=len(g_ids) * len(p_ids))
    inter = inter.reshape(len(g_ids), len(p_ids)).astype(np.float64)
    p_area, g_area = inter.sum(0), inter.sum(1)
    iou = inter / (g_area[:, None] + p_area[None, :] - inter)
    iou = iou[g_ids > 0][:, p_ids > 0]
    n_pred, n_true = int((p_ids > 0).sum()), int((g_ids > 0).sum())
    if n_pred == 0 or n_true == 0:
        return 0.0, 0.0, 0, n_pred, n_true
    r, c = linear_sum_assignment(-iou)
    good = iou[r, c] >= threshold
    tp = int(good.sum())
    return 2 * tp / (n_pred + n_true), float(iou[r, c][good].mean()) if tp else 0.0, tp, n_pred, n_true


def classical(image: np.ndarray, sigma: float, min_distance: int, factor: float) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    sm = gaussian(image.astype(np.float32), sigma=sigma, preserve_range=True)
    fg = sm > factor * threshold_otsu(sm)
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(dist, min_distance=int(min_distance), labels=ndi.label(fg)[0], exclude_border=False)
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=fg)


def tune(kind: str, seeds) -> dict:
    data = [(img, gt) for _, img, gt in stacks(kind, seeds)]
    best = None
    for sigma, md, factor in itertools.product([1.0, 2.0, 3.0], [3, 5, 7, 10, 14], [0.8, 1.0, 1.2]):
        f1 = np.mean([match(classical(img, sigma, md, factor), gt)[0] for img, gt in data])
        if best is None or f1 > best[0]:
            best = (f1, {"sigma": sigma, "min_distance": md, "factor": factor})
    print(f"{kind}: best classical on training seeds {list(seeds)}: F1 {best[0]:.3f} with {best[1]}")
    return best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true", help="choose the classical parameters on training seeds")
    ap.add_argument("--n", type=int, default=3, help="seeds per kind (each gives two stacks; --tune used 4)")
    ap.add_argument("--train", action="store_true", help="run on training seeds (1000..) instead of test seeds")
    ap.add_argument("--stability", type=float, default=None, help="stability_score_thresh of the proposals")
    ap.add_argument("--covered", type=float, default=None, help="covered fraction for a proposal to be known")
    ap.add_argument("--kinds", nargs="+", default=["nuclei", "cells"], help="which data")
    ap.add_argument("--every", type=int, default=None, help="search for new objects every N slices")
    args = ap.parse_args()
    if args.tune:
        for kind in ("nuclei", "cells"):
            tune(kind, range(1000, 1000 + args.n))
        return

    import torch

    from napari_sam2.model.auto_stack import segment_stack
    from napari_sam2.model.checkpoint import load_model
    from napari_sam2.model.config import NANO

    model = load_model(NANO.name, None, device="cpu")
    extra = {} if args.every is None else {"every": args.every}
    if args.covered is not None:
        extra["covered"] = args.covered
    if args.stability is not None:
        extra["stability_score_thresh"] = args.stability
    print(f"nano (bundled), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| data | stack | objects | SAM 2 nano F1 / mean IoU | classical F1 / mean IoU | nano s | classical s |")
    print("|---|---|---|---|---|---|---|")
    for kind, first in (("nuclei", 1000 if args.train else 9000), ("cells", 1000 if args.train else 9100)):
        if kind not in args.kinds:
            continue
        ours, theirs = [], []
        for name, image, gt in stacks(kind, range(first, first + args.n)):
            t = time.perf_counter()
            pred = segment_stack(model, image, **extra)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            ref = classical(image, **CLASSICAL[kind])
            t_ref = time.perf_counter() - t
            a, b = match(pred, gt), match(ref, gt)
            ours.append(a)
            theirs.append(b)
            print(f"| {kind} | {name} {image.shape} | {a[4]} | {a[0]:.3f} / {a[1]:.3f} ({a[3]} found) | "
                  f"{b[0]:.3f} / {b[1]:.3f} ({b[3]} found) | {t_ours:.1f} | {t_ref:.1f} |")
        mo, mt = np.mean([x[0] for x in ours]), np.mean([x[0] for x in theirs])
        io, it = np.mean([x[1] for x in ours]), np.mean([x[1] for x in theirs])
        print(f"| **{kind}** | mean of {len(ours)} | | **{mo:.3f}** / {io:.3f} | **{mt:.3f}** / {it:.3f} | | |")


if __name__ == "__main__":
    main()
