"""Plot a run's history.json (training loss, validation loss and Dice per epoch).

    .venv/bin/pip install matplotlib    # or: pip install -e .[docs]
    .venv/bin/python scripts/plot_training.py runs/nano/history.json docs/images/nano_training.png
"""

from __future__ import annotations

import json
import sys


def main(history_path: str, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_path) as f:
        hist = json.load(f)
    steps = [h["step"] for h in hist]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    tr = [(h["step"], h["train_loss"]) for h in hist if h.get("train_loss") == h.get("train_loss")]
    if tr:
        a.plot(*zip(*tr), "o-", label="training (mean over the epoch)")
    a.plot(steps, [h["val_loss"] for h in hist], "s-", label="validation")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.legend()
    b.plot(steps, [h["val_dice"] for h in hist], "s-", color="C2")
    b.set_xlabel("step")
    b.set_ylabel("validation Dice per object and clip")
    b.set_ylim(0, 1)
    b.grid(alpha=0.3)
    fig.suptitle(sys.argv[3] if len(sys.argv) > 3 else "nano model trained from scratch on generated stacks (CPU)")
    fig.tight_layout()
    fig.savefig(out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
