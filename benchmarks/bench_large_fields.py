"""Small nuclei in large frames (issue 18): whole frame vs a region around each click vs
tiles, with the bundled nano model (128 px input).

A generated time-lapse of nuclei 10-20 px across (``sample_data.cells_2d_time``) in
frames of 2048 x 2048 and 700 x 1100 pixels. One click per nucleus (its most interior
pixel) on the first frame, then propagation forward:

- *whole frame*: one session on the whole frames (resized to 128 px for the model);
- *region per click*: each nucleus on a 128 px square around its click
  (``RoiSession``, what ``--roi auto`` and "around each object" do);
- *256 crop*: the nuclei lying inside a 256 x 256 crop of the frames, one session on
  the crop (what a user would do by hand); the two methods above are also scored on
  those nuclei alone, to say how close they come to the crop.

Mean Dice over nuclei and frames. Then segment everything on the first frame, the
whole frame at once vs tiles of 128 px (F1 at IoU 0.5 against the truth). Seconds
for each. Run: ``python benchmarks/bench_large_fields.py [--quick]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from auto_quality import match

from napari_sam2.model.auto_stack import interior_point, segment_slice
from napari_sam2.model.checkpoint import load_model
from napari_sam2.model.frames import FrameSource
from napari_sam2.model.metrics import dice
from napari_sam2.model.roi import RoiSession, region_around
from napari_sam2.model.video import StackSession
from napari_sam2.sample_data import cells_2d_time


def clicks(truth0: np.ndarray, min_area: int = 30):
    """{nucleus: (x, y)} at the most interior pixel of each nucleus on the first frame."""
    out = {}
    for i in np.unique(truth0):
        m = truth0 == i
        if i == 0 or m.sum() < min_area:
            continue
        out[int(i)] = interior_point(m)
    return out


def dice_table(pred: dict, truth: np.ndarray, ids) -> np.ndarray:
    """Dice per (nucleus, frame); pred: {nucleus: T x H x W bool}."""
    out = np.zeros((len(ids), truth.shape[0]))
    for a, i in enumerate(ids):
        for t in range(truth.shape[0]):
            out[a, t] = dice(pred[i][t], truth[t] == i)
    return out


def track(session, points: dict, shape) -> dict:
    for i, (x, y) in points.items():
        session.add_points(0, i, points=[[x, y]], labels=[1])
    masks = {i: np.zeros(shape, bool) for i in points}
    for t, found in session.propagate("forward"):
        for i, m in found.items():
            masks[i][t] = m
    return masks


def whole(model, movie, rng, points):
    return track(StackSession(model, FrameSource(movie, rng)), points, movie.shape)


def per_click(model, movie, rng, points):
    frames = FrameSource(movie, rng)
    masks = {}
    for i, (x, y) in points.items():
        roi = region_around(frames.shape, model.image_size, xy=[[x, y]])
        masks.update(track(RoiSession(model, frames, roi), {i: (x, y)}, movie.shape))
    return masks


def crop_run(model, movie, rng, truth, points, side=256):
    h, w = movie.shape[1:]
    top, left = (h - side) // 2, (w - side) // 2
    inside = {}
    for i, (x, y) in points.items():
        ys, _xs = np.nonzero(truth[:, top:top + side, left:left + side].max(0) == i)
        whole_area = (truth == i).sum()
        if ys.size and (truth[:, top:top + side, left:left + side] == i).sum() == whole_area:
            inside[i] = (x - left, y - top)
    crop = np.ascontiguousarray(movie[:, top:top + side, left:left + side])
    got = track(StackSession(model, FrameSource(crop, rng)), inside, crop.shape)
    full = {}
    for i, m in got.items():
        f = np.zeros(movie.shape, bool)
        f[:, top:top + side, left:left + side] = m
        full[i] = f
    return full


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the 700 x 1100 frames, 3 of them")
    ap.add_argument("--frames", type=int, default=4)
    args = ap.parse_args()
    model = load_model("sam2.1_nano_synthetic", None, device="cpu")
    sizes = [((700, 1100), 90, 3)] + ([] if args.quick else [((2048, 2048), 420, 5)])
    rows = []
    for (h, w), n, seed in sizes:
        movie, truth = cells_2d_time((3 if args.quick else args.frames, h, w), n=n, seed=seed, radius=(5, 10),
                                     speed=0.8, brightness=(0.4, 1.0))
        rng = FrameSource(movie).intensity_range
        points = clicks(truth[0])
        ids = sorted(points)
        print(f"\n{w} x {h} frames, {movie.shape[0]} frames, {len(ids)} nuclei clicked "
              f"(diameters {2 * np.sqrt(np.bincount(truth[0].ravel())[ids] / np.pi).min():.0f}-"
              f"{2 * np.sqrt(np.bincount(truth[0].ravel())[ids] / np.pi).max():.0f} px)", flush=True)
        results = {}
        for name, fn in (("whole frame", whole), ("region per click", per_click)):
            t0 = time.perf_counter()
            masks = fn(model, movie, rng, points)
            results[name] = (dice_table(masks, truth, ids), time.perf_counter() - t0)
        t0 = time.perf_counter()
        crop_masks = crop_run(model, movie, rng, truth, points)
        crop_s = time.perf_counter() - t0
        sub = sorted(crop_masks)
        crop_dice = dice_table(crop_masks, truth, sub)
        pos = [ids.index(i) for i in sub]
        print(f"{'method':<18} {'mean Dice':>9} {'on crop nuclei':>15} {'seconds':>8}")
        for name, (table, sec) in results.items():
            print(f"{name:<18} {table.mean():9.3f} {table[pos].mean():15.3f} {sec:8.1f}")
            rows.append((f"{w}x{h}", name, table.mean(), table[pos].mean(), sec))
        print(f"{'256 crop':<18} {'':>9} {crop_dice.mean():15.3f} {crop_s:8.1f}   ({len(sub)} nuclei inside the crop)")
        rows.append((f"{w}x{h}", "256 crop", float("nan"), crop_dice.mean(), crop_s))
        region = results["region per click"][0][pos].mean()
        print(f"region per click / 256 crop (same nuclei): {region / crop_dice.mean():.2f}; "
              f"region / whole frame: {results['region per click'][0].mean() / max(results['whole frame'][0].mean(), 1e-9):.1f}x")

        for tile in (None, "auto"):
            t0 = time.perf_counter()
            lab = segment_slice(model, movie[0], rng, tile=tile)
            sec = time.perf_counter() - t0
            f1, miou, tp, n_pred, n_true = match(lab, truth[0])
            label = "automatic, whole" if tile is None else "automatic, tiles"
            print(f"{label:<18} F1@0.5 {f1:.3f} (matched IoU {miou:.2f}; {tp} of {n_true} found, {n_pred} masks) "
                  f"{sec:8.1f} s", flush=True)


if __name__ == "__main__":
    main()
