"""Per-step losses of shortened nano stages and of the command line's training runs, as
JSON, so that a refactor can be checked to leave training unchanged: run it on two commits
and compare the files (they must be equal).

    .venv/bin/python scripts/training_fingerprint.py /tmp/before.json   # on the old commit
    .venv/bin/python scripts/training_fingerprint.py /tmp/after.json    # on the new one
    cmp /tmp/before.json /tmp/after.json

Each of the stages 3, 4, 5, 6, 9, 13 and 17 of scripts/train_nano.py (between them every
recipe and training option the nano model used) runs 3 steps from the bundled weights on 3
generated stacks, with validation; the command line trains 2 steps from scratch and from
the bundled weights, as the CI test does. Recorded: every step's loss, the validation
figures and the sum of the final weights. About 20 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import tifffile
import torch

from napari_sam2.cli import main as cli
from napari_sam2.model.checkpoint import bundled_path
from napari_sam2.model.config import NANO
from napari_sam2.sample_data import cells_2d_time, random_stack
from napari_sam2.training import Trainer, prepare_stack

STAGES = (3, 4, 5, 6, 9, 13, 17)


def _nano_stages():
    spec = importlib.util.spec_from_file_location("train_nano", Path(__file__).with_name("train_nano.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers the nano recipes
    return module.STAGES


def _without_timing(history):
    return [{k: v for k, v in h.items() if k != "clips_per_s"} for h in history]


def stage_runs() -> dict:
    stages = _nano_stages()
    weights = str(bundled_path(NANO.name))
    train = [prepare_stack(*random_stack(s), 128, name=str(s)) for s in (1000, 1001, 1002)]
    val = [prepare_stack(*random_stack(5000), 128, name="5000")]
    out = {}
    for stage in STAGES:
        cfg = stages[stage][1].replace(init=weights, epochs=1, steps_per_epoch=3, warmup_steps=1, val_clips=2,
                                       clip_length=min(stages[stage][1].clip_length, 6))
        with tempfile.TemporaryDirectory() as d:
            trainer = Trainer(cfg, train, val, d)
            losses = [ev.loss for ev in trainer.run() if ev.kind == "step"]
            weight_sum = sum(float(p.double().sum()) for p in trainer.model.state_dict().values() if p.is_floating_point())
        out[f"stage{stage}"] = {"losses": losses, "hist": _without_timing(trainer.history), "wsum": weight_sum}
        print(f"stage {stage}: losses {', '.join(f'{v:.6f}' for v in losses)}", flush=True)
    return out


def command_line_runs() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        pairs = []
        for seed in (1, 2):
            image, labels = cells_2d_time((6, 64, 64), 2, seed, radius=(8, 12))
            tifffile.imwrite(d / f"i{seed}.tif", image)
            tifffile.imwrite(d / f"l{seed}.tif", labels)
            pairs += ["--pair", str(d / f"i{seed}.tif"), str(d / f"l{seed}.tif")]
        for init in ("scratch", "pretrained"):
            cli(["train", *pairs, "--out", str(d / init), "--model", NANO.name, "--init", init, "--epochs", "1",
                 "--steps-per-epoch", "2", "--clip-length", "3", "--device", "cpu"])
            out["cli_" + init] = _without_timing(json.loads((d / init / "history.json").read_text()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the JSON file to write")
    args = ap.parse_args()
    torch.set_num_threads(2)
    record = {**stage_runs(), **command_line_runs()}
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
