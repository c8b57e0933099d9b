"""Training hyper-parameters: one frozen :class:`TrainConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

#: the command line's peak learning rate when fine-tuning (``init`` not "scratch") and none
#: is given; ``TrainConfig.lr`` is the from-scratch one
FINE_TUNE_LR = 3e-5


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (all have sensible defaults for the nano model).

    init: "scratch" (random weights), "pretrained" (the model's default weights:
    the official checkpoint, or the bundled nano weights) or a path to a weights file.
    """

    model: str = "sam2.1_nano_synthetic"
    init: str = "scratch"
    image_size: Optional[int] = None  # default: the model's
    clip_length: int = 8
    clips_per_step: int = 2
    objects_per_clip: int = 3
    epochs: int = 10
    steps_per_epoch: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    val_fraction: float = 0.2
    val_clips: int = 16
    seed: int = 0
    prob_box: float = 0.25
    prob_mask: float = 0.1
    max_corrections: int = 2  # corrective clicks on the prompted slice (0..max, drawn)
    prob_tracked_correction: float = 0.3  # a corrective click on one tracked slice
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    score_weight: float = 1.0
    # mask loss (focal + dice against an empty mask, every candidate mask) on slices where
    # the object is absent, at this weight; 0 is SAM 2's recipe, where only the object
    # score learns from those slices
    absent_mask_weight: float = 0.0
    min_area: int = 12  # pixels (at model size) an object needs on the prompted slice
    device: str = "cpu"
    bf16: bool = False  # bfloat16 autocast
    # share of training clips tracked without object pointers, so that the memory
    # attention keeps using the spatial memories (see docs/training.md)
    prob_drop_pointers: float = 0.0
    # names of registered recipes (napari_sam2.training.recipes): the model surgery and
    # learning-rate scales of an experiment, applied in this order
    recipes: Tuple[str, ...] = ()

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
