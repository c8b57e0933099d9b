"""4D (issue 18): nuclei in a T-Z-Y-X movie prompted once, at t = 0, followed through z and
over time with ``segment_movie`` and the bundled nano model.

Generated movies (``tests/_stacks.moving_nuclei_movie``: textured ellipsoids 2.5 times
flatter in z, drifting ``step`` pixels per time point) with one click per nucleus on its
largest slice at t = 0. Prints the Dice of every nucleus at every time point (same id
as its click: an id swap counts as a miss), and the seconds. Run:
``python benchmarks/movie_quality.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _stacks import moving_nuclei_movie

from napari_sam2.model.checkpoint import load_model
from napari_sam2.model.metrics import dice
from napari_sam2.model.movie import segment_movie


def clicks(truth0):
    points = {}
    for i in [v for v in np.unique(truth0) if v > 0]:
        z = int(np.argmax((truth0 == i).sum(axis=(1, 2))))
        ys, xs = np.nonzero(truth0[z] == i)
        points[(z, int(i))] = ([[float(xs.mean()), float(ys.mean())]], [1])
    return points


def main() -> None:
    model = load_model("sam2.1_nano_synthetic", None, device="cpu")
    cases = [  # (time points, slices, frame, nuclei, seed, drift per time point)
        (6, 12, (96, 96), 4, 0, 3.0),
        (6, 12, (128, 160), 6, 1, 3.0),
        (6, 16, (128, 128), 5, 2, 5.0),
        (8, 12, (96, 128), 4, 3, 2.0),
    ]
    all_dice = []
    for t, z, hw, count, seed, step in cases:
        movie, truth = moving_nuclei_movie(t=t, z=z, hw=hw, count=count, seed=seed, step=step)
        for orientations in (1, 8):
            start = time.perf_counter()
            labels = segment_movie(model, movie, points=clicks(truth[0]), orientations=orientations)
            sec = time.perf_counter() - start
            table = np.zeros((count, t))
            for i in range(1, count + 1):
                for k in range(t):
                    table[i - 1, k] = dice(labels[k] == i, truth[k] == i)
            print(f"movie {t}x{z}x{hw[0]}x{hw[1]}, {count} nuclei, drift {step} px, seed {seed}, "
                  f"{orientations} orientation(s): mean Dice {table.mean():.3f}, min {table.min():.3f}, {sec:.1f} s")
            print("  Dice per nucleus (rows) and time point (columns):")
            for i, row in enumerate(table, 1):
                print(f"  {i}: " + " ".join(f"{v:.2f}" for v in row))
            if orientations == 1:
                all_dice.append(table.ravel())
    print(f"all movies, 1 orientation: mean Dice {np.concatenate(all_dice).mean():.3f}")


if __name__ == "__main__":
    main()
