"""Annotated stacks for training: preparing them at the model's size, splitting them, and sampling clips (with augmentation) as batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..model.config import DEFAULT_PERCENTILES
from ..model.errors import TrainingError
from ..model.frames import FrameSource
from ..model.preprocess import InputError
from .config import TrainConfig


@dataclass
class AnnotatedStack:
    """A stack ready for training: frames D C S S (float16 in [0, 1], C = 1 or 3)
    and labels D S S (int32 instance ids, 0 = background), both at model size."""

    frames: torch.Tensor
    labels: torch.Tensor
    name: str = ""

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def prepare_stack(image, labels, size: int, *, name: str = "", intensity_range=None,
                  percentiles: Tuple[float, float] = DEFAULT_PERCENTILES) -> AnnotatedStack:
    """Convert an (N, H, W[, C]) image and its (N, H, W) instance labels to model size.

    Intensities are mapped as at inference (given range, or the ``percentiles``: pass the
    model profile's, ``get_config(name).profile.percentiles``),
    frames are resized with antialiasing and labels with nearest neighbours.
    """
    src = FrameSource(image, intensity_range, percentiles=percentiles)
    lab = np.asarray(labels)
    if lab.shape != (src.num_frames, src.height, src.width):
        raise InputError(
            f"labels of {name or 'a stack'} have shape {lab.shape}, but the image has "
            f"{src.num_frames} slices of {src.height} x {src.width}; they must match"
        )
    if not np.issubdtype(lab.dtype, np.integer):
        if np.issubdtype(lab.dtype, np.floating) and np.array_equal(lab, np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise InputError(f"labels of {name or 'a stack'} must be integer instance ids, got dtype {lab.dtype}")
    if lab.min() < 0:
        raise InputError(f"labels of {name or 'a stack'} must be >= 0 (0 = background)")
    if not lab.any():
        raise InputError(f"labels of {name or 'a stack'} are all background; nothing to learn from")
    grey = len(np.shape(image)) == 3 or np.shape(image)[-1] == 1  # stored as one channel
    frames = []
    for i in range(src.num_frames):
        x = src.model_input(i, size)[0]  # 3 S S
        frames.append((x[:1] if grey else x).to(torch.float16))
    lab_t = torch.from_numpy(lab.astype(np.int32))[:, None].float()
    lab_t = F.interpolate(lab_t, size=(size, size), mode="nearest-exact")[:, 0].to(torch.int32)
    return AnnotatedStack(torch.stack(frames), lab_t, name)


def split_stacks(stacks: Sequence[AnnotatedStack], val_fraction: float, seed: int) -> Tuple[List[AnnotatedStack], List[AnnotatedStack]]:
    """Hold out whole stacks for validation; a single stack is split along its first axis."""
    stacks = list(stacks)
    if not stacks:
        raise TrainingError("no training data: give at least one stack with labels")
    if val_fraction <= 0:
        return stacks, []
    if len(stacks) == 1:
        s = stacks[0]
        cut = int(round(len(s) * (1 - val_fraction)))
        if cut < 2 or len(s) - cut < 2:
            raise TrainingError(f"stack {s.name!r} has {len(s)} slices: too few to hold some out for validation")
        return (
            [AnnotatedStack(s.frames[:cut], s.labels[:cut], s.name + "[train]")],
            [AnnotatedStack(s.frames[cut:], s.labels[cut:], s.name + "[val]")],
        )
    order = np.random.default_rng([seed, 17]).permutation(len(stacks))
    n_val = min(max(1, int(round(len(stacks) * val_fraction))), len(stacks) - 1)
    val = [stacks[i] for i in sorted(order[:n_val])]
    tr = [stacks[i] for i in sorted(order[n_val:])]
    return tr, val


# ---------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Clips of T slices, several objects each.

    images N T 3 S S in [0, 1]; targets B T S S bool (one row per object);
    obj_clip B: the clip of each object; prompt_frame: the prompted slice
    (the same in every clip); prompt_kind: "click", "box" or "mask".
    """

    images: torch.Tensor
    targets: torch.Tensor
    obj_clip: torch.Tensor
    prompt_frame: int
    prompt_kind: str
    corrections: int = 0
    tracked_correction: Optional[int] = None


def _objects_on(labels: torch.Tensor, min_area: int) -> np.ndarray:
    ids, counts = torch.unique(labels, return_counts=True)
    keep = (ids > 0) & (counts >= min_area)
    return ids[keep].numpy()


def _augment(frames: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
    """Random rotation by 90 degree steps, flip and intensity jitter of one clip."""
    k = int(rng.integers(4))
    if k:
        frames, labels = torch.rot90(frames, k, (-2, -1)), torch.rot90(labels, k, (-2, -1))
    if rng.random() < 0.5:
        frames, labels = frames.flip(-1), labels.flip(-1)
    gamma = math.exp(rng.uniform(-0.4, 0.4))
    gain, offset = rng.uniform(0.75, 1.25), rng.uniform(-0.1, 0.1)
    frames = (frames.float().clamp(0, 1) ** gamma * gain + offset).clamp(0, 1)
    return frames, labels


def sample_batch(
    stacks: Sequence[AnnotatedStack], cfg: TrainConfig, rng: np.random.Generator, *, augment: bool = True,
    prompt_frame: Optional[int] = None, prompt_kind: Optional[str] = None,
) -> Batch:
    """Draw ``cfg.clips_per_step`` clips with up to ``cfg.objects_per_clip`` objects each."""
    usable = [s for s in stacks if len(s) >= 2]
    if not usable:
        raise TrainingError("every stack has fewer than 2 slices; tracking needs at least 2")
    t_len = min(cfg.clip_length, max(len(s) for s in usable))
    usable = [s for s in usable if len(s) >= t_len]
    weights = np.array([len(s) - t_len + 1 for s in usable], np.float64)
    weights /= weights.sum()
    p = int(rng.integers(t_len)) if prompt_frame is None else prompt_frame
    if prompt_kind is None:
        u = rng.random()
        prompt_kind = "box" if u < cfg.prob_box else "mask" if u < cfg.prob_box + cfg.prob_mask else "click"
    images, targets, obj_clip = [], [], []
    for c in range(cfg.clips_per_step):
        for _ in range(100):
            s = usable[int(rng.choice(len(usable), p=weights))]
            start = int(rng.integers(0, len(s) - t_len + 1))
            lab = s.labels[start : start + t_len]
            ids = _objects_on(lab[p], cfg.min_area)
            if len(ids):
                break
        else:
            raise TrainingError(
                f"found no object of at least {cfg.min_area} pixels (at model size) in 100 tries; "
                "are the labels empty or the objects tiny?"
            )
        chosen = rng.choice(ids, size=min(cfg.objects_per_clip, len(ids)), replace=False)
        frames = s.frames[start : start + t_len]
        if augment:
            frames, lab = _augment(frames, lab, rng)
        images.append(frames.float().expand(-1, 3, -1, -1))
        targets.extend(lab == int(i) for i in chosen)
        obj_clip.extend([c] * len(chosen))
    batch = Batch(torch.stack(images), torch.stack(targets), torch.tensor(obj_clip), p, prompt_kind)
    if augment and rng.random() < 0.5:  # play the clips backwards
        batch.images, batch.targets = batch.images.flip(1), batch.targets.flip(1)
        batch.prompt_frame = t_len - 1 - p
    if augment:
        batch.corrections = 0 if prompt_kind == "mask" else int(rng.integers(0, cfg.max_corrections + 1))
        others = [t for t in range(t_len) if t != batch.prompt_frame]
        if others and rng.random() < cfg.prob_tracked_correction:
            batch.tracked_correction = int(rng.choice(others))
    return batch


