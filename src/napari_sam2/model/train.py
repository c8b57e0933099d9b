"""Training and fine-tuning of SAM 2 on annotated stacks (no napari import).

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_save
from .config import SAM2Config, get_config
from .errors import TrainingError
from .files import atomic_write_text
from .frames import FrameSource
from .metrics import dice_per_row
from .preprocess import InputError
from .sam2 import LOGIT_CLAMP, FrameFeatures, HeadsOutput, SAM2Model, build_model
from .tracking import (
    FrameOutput,
    PointPrompt,
    encode_memory,
    maskmem_pos_tokens,
    track_step,
)

__all__ = [
    "AnnotatedStack",
    "TrainConfig",
    "TrainEvent",
    "Trainer",
    "TrainingError",
    "prepare_stack",
    "split_stacks",
    "train",
]




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
    # parameter-name prefixes re-initialised (seeded) after loading ``init``, e.g.
    # ("memory_attention", "memory_encoder") to give a collapsed memory path a new start
    reinit: Tuple[str, ...] = ()
    # share of training clips tracked without object pointers, so that the memory
    # attention keeps using the spatial memories (see docs/training.md)
    prob_drop_pointers: float = 0.0
    # parameter-name prefixes kept fixed during the run (e.g. "image_encoder" while a
    # re-initialised memory path learns)
    freeze: Tuple[str, ...] = ()
    # memories made from the mask alone: the memory encoder's image projection is set to
    # zero and frozen, so that the memory says where the object was and nothing else
    mask_only_memory: bool = False
    # start the memory cross-attention local: equal query and key biases of this size on
    # the fastest rotary frequencies, so that a slice's token looks at the memory tokens
    # of the same place (0: leave the attention as loaded)
    local_memory_init: float = 0.0
    # rescale the image embedding (the neck's two coarsest levels) to this mean token norm
    # at the start of the run (0: leave it): a backbone trained from scratch lets it grow
    # without bound, which drowns the position encoding of the memory attention's queries
    embed_norm: float = 0.0
    # (parameter-name prefix, factor) pairs: those parameters learn at factor x the
    # learning rate (e.g. a projection that starts at zero and must grow in a short run)
    lr_scale: Tuple[Tuple[str, float], ...] = ()

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class AnnotatedStack:
    """A stack ready for training: frames D C S S (float16 in [0, 1], C = 1 or 3)
    and labels D S S (int32 instance ids, 0 = background), both at model size."""

    frames: torch.Tensor
    labels: torch.Tensor
    name: str = ""

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def prepare_stack(image, labels, size: int, *, name: str = "", intensity_range=None) -> AnnotatedStack:
    """Convert an (N, H, W[, C]) image and its (N, H, W) instance labels to model size.

    Intensities are mapped as at inference (given range, or robust percentiles),
    frames are resized with antialiasing and labels with nearest neighbours.
    """
    src = FrameSource(image, intensity_range)
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


# ---------------------------------------------------------------------- prompts


def _pick_pixels(weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One flat pixel index per row, drawn with the given non-negative weights."""
    w = weights.flatten(1).float()
    empty = w.sum(1) == 0
    if empty.any():
        w = w.clone()
        w[empty] = 1.0
    return torch.multinomial(w, 1, generator=gen)[:, 0]


def _xy(idx: torch.Tensor, side: int) -> torch.Tensor:
    return torch.stack([idx % side, idx // side], dim=-1).float()[:, None]  # B 1 2


def click_from_mask(gt: torch.Tensor, gen: torch.Generator) -> PointPrompt:
    """One positive click drawn uniformly inside each B S S mask."""
    idx = _pick_pixels(gt, gen)
    return PointPrompt(_xy(idx, gt.shape[-1]), torch.ones(gt.shape[0], 1, dtype=torch.int32))


def central_click(gt: torch.Tensor) -> PointPrompt:
    """One positive click per B S S mask at its most interior pixel (where a user clicks)."""
    from .evaluate import central_pixel

    xy = [central_pixel(m) for m in gt.cpu().numpy()]
    return PointPrompt(torch.tensor(xy, dtype=torch.float32)[:, None], torch.ones(len(xy), 1, dtype=torch.int32))


def noisy_box(gt: torch.Tensor, gen: torch.Generator, jitter: float = 0.1) -> PointPrompt:
    """The bounding box of each B S S mask, each side moved by up to ``jitter`` of its size."""
    side = gt.shape[-1]
    rows, cols = gt.any(-1), gt.any(-2)  # B S
    ar = torch.arange(side, dtype=torch.float32)
    big = float(side)
    y0 = torch.where(rows, ar, big).amin(1)
    y1 = torch.where(rows, ar, -1.0).amax(1)
    x0 = torch.where(cols, ar, big).amin(1)
    x1 = torch.where(cols, ar, -1.0).amax(1)
    box = torch.stack([x0, y0, x1, y1], 1)
    size = torch.stack([x1 - x0, y1 - y0, x1 - x0, y1 - y0], 1) + 1
    noise = (torch.rand(box.shape, generator=gen) * 2 - 1) * jitter * size
    box = (box + noise).clamp(0, side - 1)
    lo, hi = torch.minimum(box[:, :2], box[:, 2:]), torch.maximum(box[:, :2], box[:, 2:])
    coords = torch.stack([lo, hi], 1)  # B 2 2
    labels = torch.tensor([[2, 3]], dtype=torch.int32).expand(gt.shape[0], -1)
    return PointPrompt(coords, labels.contiguous())


def correction_click(logits: torch.Tensor, gt: torch.Tensor, gen: torch.Generator) -> PointPrompt:
    """A click in each object's error region: positive where the mask is missing,
    negative where it overflows (a positive inside the object when there is no error)."""
    pred = logits[:, 0] > 0
    err = pred ^ gt
    w = torch.where(err.flatten(1).any(1)[:, None, None], err, gt)
    idx = _pick_pixels(w, gen)
    lab = gt.flatten(1).gather(1, idx[:, None]).int()
    return PointPrompt(_xy(idx, gt.shape[-1]), lab)


# ---------------------------------------------------------------------- losses


def mask_losses(logits: torch.Tensor, gt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid focal (alpha 0.25, gamma 2, mean over pixels) and dice losses: B M each."""
    t = gt[:, None].float().expand_as(logits)
    x = logits.flatten(2)
    t = t.flatten(2)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    focal = (ce * (1 - p_t) ** 2 * (0.25 * t + 0.75 * (1 - t))).mean(-1)
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    return focal, dice


def heads_loss(heads: HeadsOutput, gt: torch.Tensor, cfg: TrainConfig) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Loss of one output for B objects; gt B S S bool. Mask and IoU terms only where
    the object is present; with several masks only the best one is trained."""
    masks = heads.high_res_multimasks.float()  # B M S S
    present = gt.flatten(1).any(1).float()
    focal, dice = mask_losses(masks, gt)
    combo = cfg.focal_weight * focal + cfg.dice_weight * dice
    best = combo.argmin(1)
    rows = torch.arange(masks.shape[0])
    mask_l = combo[rows, best]
    with torch.no_grad():
        pred = masks > 0
        g = gt[:, None]
        inter = (pred & g).flatten(2).sum(-1).float()
        union = (pred | g).flatten(2).sum(-1).float()
        true_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    iou_l = (heads.ious.float() - true_iou).abs().mean(1)
    score_l = F.binary_cross_entropy_with_logits(heads.object_score_logits[:, 0].float(), present, reduction="none")
    total = present * (mask_l + cfg.iou_weight * iou_l) + cfg.score_weight * score_l
    if cfg.absent_mask_weight:
        total = total + (1 - present) * cfg.absent_mask_weight * combo.mean(1)
    parts = {
        "focal": float((present * focal[rows, best]).detach().mean()),
        "dice": float((present * dice[rows, best]).detach().mean()),
        "iou": float((present * iou_l).detach().mean()),
        "score": float(score_l.detach().mean()),
    }
    return total.mean(), parts


# ---------------------------------------------------------------------- one clip


@dataclass
class ClipResult:
    loss: torch.Tensor
    parts: Dict[str, float]
    masks: torch.Tensor  # B T S S bool, the final output of every slice


def run_clip(
    model: SAM2Model, batch: Batch, cfg: TrainConfig, gen: torch.Generator, *, central: bool = False
) -> ClipResult:
    """Prompt, track and score every object of ``batch`` (differentiable in train mode).

    central: use one click at the most interior pixel (validation) instead of
    the drawn prompt.
    """
    device = next(model.parameters()).device
    images = batch.images.to(device)
    t_len = images.shape[1]
    targets = batch.targets.to(device)
    b = targets.shape[0]
    feats_all = model.frame_features(model.normalize(images.flatten(0, 1)))
    obj_clip = batch.obj_clip.to(device)

    def feats_at(t: int) -> FrameFeatures:
        idx = obj_clip * t_len + t
        return FrameFeatures(
            feats_all.image_embed[idx], [h[idx] for h in feats_all.high_res], feats_all.pos[idx]
        )

    maskmem_pos = maskmem_pos_tokens(model, feats_at(0))
    # the pointer position encoding is normalised by min(stack length, 16): use the
    # value a full stack gives at inference
    num_frames = max(t_len, model.config.max_obj_ptrs_in_encoder)
    cond: Dict[int, FrameOutput] = {}
    non_cond: Dict[int, FrameOutput] = {}
    losses: List[torch.Tensor] = []
    parts_sum: Dict[str, float] = {}
    masks = torch.zeros(b, t_len, *targets.shape[-2:], dtype=torch.bool)

    def add_loss(heads: HeadsOutput, t: int) -> None:
        loss, parts = heads_loss(heads, targets[:, t], cfg)
        losses.append(loss)
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v

    def remember(t: int, heads: HeadsOutput, feats: FrameFeatures, *, is_cond: bool, from_clicks: bool) -> None:
        mem = encode_memory(model, feats, heads.high_res_masks, heads.object_score_logits, from_clicks=from_clicks)
        out = FrameOutput(None, heads.obj_ptr, heads.object_score_logits, mem)
        (cond if is_cond else non_cond)[t] = out
        masks[:, t] = (heads.high_res_masks[:, 0] > 0).detach().cpu()

    binarize = not model.training  # as at inference: masks from clicks enter memory binarised
    use_pointers = not (model.training and cfg.prob_drop_pointers > 0
                        and float(torch.rand((), generator=gen)) < cfg.prob_drop_pointers)
    p = batch.prompt_frame
    f = feats_at(p)
    gt = targets[:, p]
    kind = "click" if central else batch.prompt_kind
    if kind == "mask":
        heads = model.mask_as_output(f, gt[:, None].float())
        add_loss(heads, p)
    else:
        if central:
            prompt = central_click(gt)
        elif kind == "box":
            prompt = noisy_box(gt.cpu(), gen)
        else:
            prompt = click_from_mask(gt.cpu(), gen)
        prompt = PointPrompt(prompt.coords.to(device), prompt.labels.to(device))
        heads = None
        for i in range(1 + (0 if central else batch.corrections)):
            prev = None
            if heads is not None:
                extra = correction_click(heads.high_res_masks.detach().cpu(), gt.cpu(), gen)
                prompt = prompt.extended(extra.coords.to(device), extra.labels.to(device))
                prev = heads.low_res_masks.detach().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
            heads = track_step(
                model, f, p, is_init_cond_frame=True, prompt=prompt, mask_input=None, cond=cond,
                non_cond=non_cond, maskmem_pos=maskmem_pos, reverse=False, num_frames=num_frames,
                prev_mask_logits=prev,
            )
            add_loss(heads, p)
    remember(p, heads, f, is_cond=True, from_clicks=binarize and kind != "mask")

    for order, reverse in ((range(p + 1, t_len), False), (range(p - 1, -1, -1), True)):
        for t in order:
            f = feats_at(t)
            heads = track_step(
                model, f, t, is_init_cond_frame=False, prompt=None, mask_input=None, cond=cond,
                non_cond=non_cond, maskmem_pos=maskmem_pos, reverse=reverse, num_frames=num_frames,
                use_pointers=use_pointers,
            )
            add_loss(heads, t)
            is_cond = False
            if t == batch.tracked_correction and not central:
                click = correction_click(heads.high_res_masks.detach().cpu(), targets[:, t].cpu(), gen)
                heads = track_step(
                    model, f, t, is_init_cond_frame=False,
                    prompt=PointPrompt(click.coords.to(device), click.labels.to(device)), mask_input=None,
                    cond=cond, non_cond=non_cond, maskmem_pos=maskmem_pos, reverse=reverse,
                    num_frames=num_frames, prev_mask_logits=heads.low_res_masks.detach().clamp(-LOGIT_CLAMP, LOGIT_CLAMP),
                    use_pointers=use_pointers,
                )
                add_loss(heads, t)
                is_cond = True
            remember(t, heads, f, is_cond=is_cond, from_clicks=False)
    loss = torch.stack(losses).mean()
    parts = {k: v / len(losses) for k, v in parts_sum.items()}
    return ClipResult(loss, parts, masks)


# ---------------------------------------------------------------------- the trainer


@dataclass
class TrainEvent:
    """Progress of a run: kind "step" after each optimiser step, "epoch" after each
    validation (with ``metrics``), "done" at the end."""

    kind: str
    step: int
    total_steps: int
    epoch: int
    loss: float = float("nan")
    lr: float = 0.0
    clips_per_s: float = 0.0
    metrics: Dict[str, float] = field(default_factory=dict)


class Trainer:
    """A training run writing to ``out_dir``.

    out_dir/checkpoint.pt: everything needed to resume (weights, optimiser,
    step, history); out_dir/weights.pt: the latest weights alone, loadable with
    ``load_model(cfg.model, out_dir / "weights.pt")``; out_dir/history.json: the
    metrics of every epoch.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        train_stacks: Sequence[AnnotatedStack],
        val_stacks: Sequence[AnnotatedStack],
        out_dir: Union[str, Path],
        *,
        model: Optional[SAM2Model] = None,
    ) -> None:
        if not train_stacks:
            raise TrainingError("no training stacks")
        self.cfg = cfg
        self.train_stacks = list(train_stacks)
        self.val_stacks = list(val_stacks)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(cfg.device)
        self.model = (model if model is not None else make_model(cfg)).to(self.device)
        adapt_model(self.model, cfg, self.train_stacks)
        size = self.model.image_size
        for s in self.train_stacks + self.val_stacks:
            if s.frames.shape[-1] != size or s.labels.shape[-1] != size:
                raise TrainingError(f"stack {s.name!r} was prepared at {s.frames.shape[-1]} px, the model takes {size} px")
        _require_prefixes(self.model, [prefix for prefix, _ in cfg.lr_scale], "lr_scale")
        groups: Dict[Tuple[bool, float], List[torch.nn.Parameter]] = {}
        for name, prm in self.model.named_parameters():
            no_decay = prm.ndim <= 1 or "pos_embed" in name or name.endswith(
                ("tpos_enc", "_embed", "no_obj_ptr", "embed_spatial"))
            scale = next((f for prefix, f in cfg.lr_scale if name.startswith(prefix)), 1.0)
            groups.setdefault((no_decay, scale), []).append(prm)
        self.optimizer = torch.optim.AdamW(
            [{"params": prms, "weight_decay": 0.0 if no_decay else cfg.weight_decay, "lr_scale": scale}
             for (no_decay, scale), prms in sorted(groups.items(), key=lambda kv: kv[0])],  # decayed first
            lr=cfg.lr, betas=(0.9, 0.999),
        )
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self._val_batches: Optional[List[Batch]] = None

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.cfg.steps_per_epoch

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        span = max(self.total_steps - cfg.warmup_steps, 1)
        frac = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    def _amp(self):
        from .devices import autocast_context

        return autocast_context(self.device, torch.bfloat16 if self.cfg.bf16 else None)

    # ------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {
            "format": "napari-sam2 training checkpoint 1",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "history": self.history,
            "train_config": asdict(self.cfg),
            "model_config": {"name": self.model.config.name, "image_size": self.model.image_size},
        }

    def save(self) -> Path:
        path = self.out_dir / "checkpoint.pt"
        atomic_save(self.state(), path)
        atomic_save(self.model.state_dict(), self.out_dir / "weights.pt")
        atomic_write_text(self.out_dir / "history.json", json.dumps(self.history, indent=1), what="the history")
        return path

    def resume(self, path: Union[str, Path, None] = None) -> None:
        """Continue from a checkpoint written by :meth:`save` (default: out_dir's)."""
        path = Path(path) if path is not None else self.out_dir / "checkpoint.pt"
        if not path.exists():
            raise TrainingError(f"no checkpoint to resume at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise TrainingError(f"{path} is not a readable training checkpoint ({err.__class__.__name__})") from err
        if not isinstance(state, dict) or state.get("format") != "napari-sam2 training checkpoint 1":
            raise TrainingError(f"{path} is not a napari-sam2 training checkpoint")
        mc = state["model_config"]
        if mc["name"] != self.model.config.name or mc["image_size"] != self.model.image_size:
            raise TrainingError(
                f"{path} trains model {mc['name']!r} at {mc['image_size']} px, this run "
                f"{self.model.config.name!r} at {self.model.image_size} px"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.history = list(state["history"])

    # ------------------------------------------------------------ the loop

    def train_step(self) -> Tuple[float, Dict[str, float]]:
        """One optimiser step (deterministic given the seed and the step number)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        torch.manual_seed(int(rng.integers(2**62)))  # dropout
        batch = sample_batch(self.train_stacks, cfg, rng)
        self.model.train()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step) * g.get("lr_scale", 1.0)
        with self._amp():
            res = run_clip(self.model, batch, cfg, gen)
        if not torch.isfinite(res.loss):
            raise TrainingError(
                f"the loss became {float(res.loss)} at step {self.step}; lower the learning rate (now {cfg.lr})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        res.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return float(res.loss.detach()), res.parts

    def validation_batches(self) -> List[Batch]:
        """A fixed set of clips (the same every epoch): the middle slice is prompted."""
        if self._val_batches is None:
            cfg = self.cfg.replace(clips_per_step=1, objects_per_clip=max(self.cfg.objects_per_clip, 3))
            rng = np.random.default_rng([self.cfg.seed, 2**31])
            stacks = self.val_stacks
            t_len = min(cfg.clip_length, max(len(s) for s in stacks)) if stacks else 0
            self._val_batches = [
                sample_batch(stacks, cfg, rng, augment=False, prompt_frame=t_len // 2, prompt_kind="click")
                for _ in range(self.cfg.val_clips)
            ] if stacks else []
        return self._val_batches

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Mean loss and per-object Dice over the clip (one central click on the middle slice)."""
        batches = self.validation_batches()
        if not batches:
            return {}
        self.model.eval()
        losses, dices = [], []
        gen = torch.Generator().manual_seed(0)
        for batch in batches:
            with self._amp():
                res = run_clip(self.model, batch, self.cfg, gen, central=True)
            losses.append(float(res.loss))
            d = dice_per_row(res.masks, batch.targets.cpu())
            dices.extend(d.tolist())
        return {"val_loss": float(np.mean(losses)), "val_dice": float(np.mean(dices))}

    def run(self, should_stop: Optional[Callable[[], bool]] = None) -> Iterator[TrainEvent]:
        """Train to the end (or until ``should_stop()``), yielding progress events.

        A checkpoint is written after every epoch, so stopping loses at most one epoch.
        """
        cfg = self.cfg
        total = self.total_steps
        if self.step == 0 and not self.history and self.val_stacks:
            metrics = {"epoch": 0, "step": 0, "train_loss": float("nan"), **self.validate()}
            self.history.append(metrics)
            yield TrainEvent("epoch", 0, total, 0, metrics=metrics)
        epoch_losses: List[float] = []
        t0, clips = time.perf_counter(), 0
        epoch_start = time.perf_counter()
        while self.step < total:
            if should_stop is not None and should_stop():
                return
            loss, _ = self.train_step()
            epoch_losses.append(loss)
            clips += cfg.clips_per_step
            rate = clips / max(time.perf_counter() - t0, 1e-9)
            epoch = (self.step - 1) // cfg.steps_per_epoch + 1
            yield TrainEvent("step", self.step, total, epoch, loss=loss, lr=self.lr_at(self.step - 1), clips_per_s=rate)
            if self.step % cfg.steps_per_epoch == 0 or self.step == total:
                train_time = time.perf_counter() - epoch_start
                metrics = {
                    "epoch": epoch,
                    "step": self.step,
                    "train_loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
                    "clips_per_s": len(epoch_losses) * cfg.clips_per_step / max(train_time, 1e-9),
                    **self.validate(),
                }
                self.history.append(metrics)
                self.save()
                epoch_losses = []
                yield TrainEvent("epoch", self.step, total, epoch, metrics=metrics)
                epoch_start = time.perf_counter()
        yield TrainEvent("done", self.step, total, cfg.epochs, metrics=self.history[-1] if self.history else {})


def make_model(cfg: TrainConfig) -> SAM2Model:
    """The model a run starts from: random, the model's default weights, or a file."""
    from .checkpoint import load_model

    model_cfg: SAM2Config = get_config(cfg.model)
    if cfg.image_size is not None:
        model_cfg = model_cfg.with_image_size(cfg.image_size)
    if cfg.init == "scratch":
        torch.manual_seed(cfg.seed)
        return build_model(model_cfg)
    if cfg.init == "pretrained":
        model = load_model(cfg.model, image_size=cfg.image_size)
    else:
        model = load_model(cfg.model, cfg.init, image_size=cfg.image_size)
    return reinitialise(model, cfg.reinit, cfg.seed)


def reinitialise(model: SAM2Model, prefixes: Sequence[str], seed: int) -> SAM2Model:
    """Replace the parameters and buffers whose names start with one of ``prefixes``
    by those of a freshly built model (seeded); the rest is kept."""
    if not prefixes:
        return model
    state = model.state_dict()
    chosen = [k for k in state if k.startswith(tuple(prefixes))]
    if not chosen:
        raise TrainingError(f"reinit: no parameter name starts with {', '.join(prefixes)}")
    torch.manual_seed(seed)
    fresh = build_model(model.config).state_dict()
    state.update({k: fresh[k].to(state[k].device, state[k].dtype) for k in chosen})
    model.load_state_dict(state)
    return model


def _require_prefixes(model: SAM2Model, prefixes: Sequence[str], option: str) -> None:
    """Refuse a parameter-name prefix (of the option ``option``) that names no parameter."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise TrainingError(f"{option}: no parameter name starts with {prefix!r}")


def adapt_model(model: SAM2Model, cfg: TrainConfig, stacks: Sequence[AnnotatedStack] = ()) -> SAM2Model:
    """Apply the run's start-of-training changes: ``embed_norm``, ``local_memory_init``,
    ``mask_only_memory`` and ``freeze`` (see :class:`TrainConfig`)."""
    if cfg.embed_norm > 0:
        if not stacks:
            raise TrainingError("embed_norm needs training stacks to measure the embedding on")
        # middle slices of up to 8 stacks, grey ones repeated to 3 channels
        frames = torch.stack([s.frames[len(s) // 2].float().expand(3, -1, -1) for s in list(stacks)[:8]])
        frames = frames.to(model.device)
        with torch.no_grad():
            norm = float(model.frame_features(model.normalize(frames)).image_embed.norm(dim=1).mean())
            scale = cfg.embed_norm / max(norm, 1e-12)
            # the coarsest level is the sum of the two coarsest lateral convolutions (top-down)
            for conv in list(model.image_encoder.neck.convs)[:2]:
                for prm in conv.parameters():
                    prm.mul_(scale)
            model.no_mem_embed.mul_(scale)
    if cfg.local_memory_init > 0:
        for layer in model.memory_attention.layers:
            att = layer.cross_attn_image
            head_dim = att.internal_dim // att.num_heads
            bias = torch.zeros(att.num_heads, head_dim // 2, 2)
            fast = min(8, head_dim // 4)  # rotary pairs: x frequencies first, then y, fastest first
            bias[:, :fast, 0] = cfg.local_memory_init
            bias[:, head_dim // 4: head_dim // 4 + fast, 0] = cfg.local_memory_init
            with torch.no_grad():
                att.q_proj.bias.copy_(bias.flatten())
                att.k_proj.bias.copy_(bias.flatten())
    _require_prefixes(model, cfg.freeze, "freeze")
    for name, prm in model.named_parameters():
        if name.startswith(tuple(cfg.freeze)):
            prm.requires_grad_(False)
    if cfg.mask_only_memory:
        for prm in model.memory_encoder.pix_feat_proj.parameters():
            with torch.no_grad():
                prm.zero_()
            prm.requires_grad_(False)
    return model


def format_event(ev: TrainEvent) -> Optional[str]:
    """A one-line report of an epoch (None for other events)."""
    if ev.kind != "epoch":
        return None
    m = ev.metrics
    parts = [f"epoch {ev.epoch:3d}", f"step {ev.step}/{ev.total_steps}"]
    if not math.isnan(m.get("train_loss", float("nan"))):
        parts.append(f"train loss {m['train_loss']:.4f}")
    if "val_loss" in m:
        parts += [f"val loss {m['val_loss']:.4f}", f"val Dice {m['val_dice']:.3f}"]
    if "clips_per_s" in m:
        parts.append(f"{m['clips_per_s']:.2f} clips/s")
    return "  ".join(parts)


def train(
    cfg: TrainConfig,
    stacks: Sequence[AnnotatedStack],
    out_dir: Union[str, Path],
    *,
    val_stacks: Optional[Sequence[AnnotatedStack]] = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> Trainer:
    """Run a whole training (printing one line per epoch) and return the trainer.

    Without ``val_stacks``, ``cfg.val_fraction`` of ``stacks`` is held out.
    """
    if val_stacks is None:
        stacks, val_stacks = split_stacks(stacks, cfg.val_fraction, cfg.seed)
    trainer = Trainer(cfg, stacks, val_stacks, out_dir)
    if resume:
        trainer.resume()
        log(f"resumed at step {trainer.step}")
    log(
        f"training {cfg.model} ({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters) "
        f"on {len(trainer.train_stacks)} stacks, validating on {len(trainer.val_stacks)}; "
        f"{trainer.total_steps} steps of {cfg.clips_per_step} clips x {cfg.clip_length} slices"
    )
    last = time.perf_counter()
    for ev in trainer.run():
        line = format_event(ev)
        if line:
            log(line)
        elif ev.kind == "step" and time.perf_counter() - last > 30:
            log(f"  step {ev.step}/{ev.total_steps}  loss {ev.loss:.4f}  lr {ev.lr:.2e}  {ev.clips_per_s:.2f} clips/s")
            last = time.perf_counter()
    log(f"done; weights in {trainer.out_dir / 'weights.pt'}")
    return trainer
