"""Training and fine-tuning of SAM 2 on annotated stacks (pure PyTorch, no napari import).

The recipe follows SAM 2's video training in outline:

1. sample short clips of consecutive slices (or frames) from stacks with
   instance labels, several objects per clip, with flips, rotations, time
   reversal and intensity jitter;
2. prompt every object on one slice of the clip: a click sampled from its
   mask, a noisy box, or the mask itself, followed by corrective clicks sampled
   from the error region;
3. track the objects through the rest of the clip with the memory (forward
   from the prompted slice, then backward), sometimes with a corrective click
   on one tracked slice, which then joins the prompted ones;
4. train on every output of every slice: focal + dice on the masks (the best of
   the multimask outputs), L1 on the predicted IoU, BCE on the object score.

:class:`Trainer` runs it as a generator of :class:`TrainEvent` (so that a GUI
can show progress and stop between steps); :func:`train` runs it to the end and
prints. Every epoch ends with a validation pass on held-out stacks — one
positive click on the middle slice of each object, propagated both ways, as a
user would — and a checkpoint that :meth:`Trainer.resume` continues exactly.
A run is deterministic for a given seed (on the same machine and thread count).

The package, one concern per module: :mod:`.config` (hyper-parameters), :mod:`.data`
(stacks, splits, clip sampling and augmentation), :mod:`.prompts` (prompts simulated
from masks), :mod:`.losses`, :mod:`.clip` (one clip tracked through the memory),
:mod:`.recipes` (named hooks for an experiment's model surgery) and :mod:`.trainer` (the loop,
validation, checkpoints).
"""

from ..model.errors import TrainingError
from .clip import ClipResult, run_clip
from .config import FINE_TUNE_LR, TrainConfig
from .data import AnnotatedStack, Batch, prepare_stack, sample_batch, split_stacks
from .losses import heads_loss, mask_losses
from .prompts import central_click, click_from_mask, correction_click, noisy_box
from .recipes import (
    RECIPES,
    Recipe,
    freeze,
    make_model,
    normalise_embedding,
    prepare_model,
    register_recipe,
    reinitialise,
)
from .trainer import Trainer, TrainEvent, format_event, train

__all__ = [
    "FINE_TUNE_LR",
    "RECIPES",
    "AnnotatedStack",
    "Batch",
    "ClipResult",
    "Recipe",
    "TrainConfig",
    "TrainEvent",
    "Trainer",
    "TrainingError",
    "central_click",
    "click_from_mask",
    "correction_click",
    "format_event",
    "freeze",
    "heads_loss",
    "make_model",
    "mask_losses",
    "noisy_box",
    "normalise_embedding",
    "prepare_model",
    "prepare_stack",
    "register_recipe",
    "reinitialise",
    "run_clip",
    "sample_batch",
    "split_stacks",
    "train",
]
