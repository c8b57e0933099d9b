"""End-to-end quality of the bundled nano model, as a user works: one click in the middle
of each nucleus of a generated stack that training never saw, propagated both ways, scored
against the generator's labels (docs/benchmarks.md has the figures these floors guard).
The widget's default for this model tracks in 8 orientations; 1 is plain SAM 2."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam2.model import load_model, tracking
from napari_sam2.model.config import NANO
from napari_sam2.model.evaluate import click_and_propagate
from napari_sam2.sample_data import nuclei_3d

# regression floors, a little under what docs/benchmarks.md records for the shipped weights
# (the goal of issue 5, 0.85, is not reached yet)
FLOOR_ONE_STACK = 0.80  # measured 0.825 (seed 9000), 1 orientation
FLOOR_FIVE_STACKS = 0.80  # measured 0.822 (seeds 9000-9004), 1 orientation
FLOOR_ONE_STACK_8 = 0.82  # measured 0.842 (seed 9000), 8 orientations (the default)
FLOOR_FIVE_STACKS_8 = 0.82  # measured 0.840 (seeds 9000-9004), 8 orientations


@pytest.fixture(scope="module")
def model():
    return load_model(NANO.name)  # the bundled file, checked against its SHA-256 sum


@pytest.fixture(scope="module")
def dice_seed_9000(model):
    return _mean_dice(model, [9000])


@pytest.fixture(scope="module")
def dice_seed_9000_eight(model):
    return _mean_dice(model, [9000], orientations=8)


def _mean_dice(model, seeds, orientations=1) -> float:
    scores = []
    for seed in seeds:
        image, labels = nuclei_3d(seed=seed)
        scores += click_and_propagate(model, image, labels, orientations=orientations)
    return float(np.mean([s.dice_3d for s in scores]))


def test_bundled_nano_follows_unseen_nuclei(dice_seed_9000):
    assert dice_seed_9000 >= FLOOR_ONE_STACK


def test_eight_orientations_do_better(dice_seed_9000, dice_seed_9000_eight):
    """The widget's default for the nano model: at least 0.01 above plain SAM 2 tracking
    (measured 0.842 against 0.825) and above its own floor."""
    assert dice_seed_9000_eight >= FLOOR_ONE_STACK_8
    assert dice_seed_9000_eight >= dice_seed_9000 + 0.01, (dice_seed_9000_eight, dice_seed_9000)


def test_tracking_comes_from_the_spatial_memories(model, dice_seed_9000, monkeypatch):
    """Without its spatial memories the model must do clearly worse: the memory path is
    what follows the nucleus, not the click's slice alone or the object pointers."""
    monkeypatch.setattr(tracking, "select_memories", lambda *args: [])
    without = _mean_dice(model, [9000])
    assert dice_seed_9000 - without >= 0.1, (dice_seed_9000, without)


@pytest.mark.slow
def test_bundled_nano_on_five_unseen_stacks(model):
    assert _mean_dice(model, range(9000, 9005)) >= FLOOR_FIVE_STACKS


@pytest.mark.slow
def test_bundled_nano_on_five_unseen_stacks_eight_orientations(model):
    assert _mean_dice(model, range(9000, 9005), orientations=8) >= FLOOR_FIVE_STACKS_8
