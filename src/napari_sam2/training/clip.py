"""One training clip: prompt every object on one slice, track through the clip with the memory, and collect the losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from ..model.sam2 import LOGIT_CLAMP, FrameFeatures, HeadsOutput, SAM2Model
from ..model.tracking import (
    FrameOutput,
    MemoryBank,
    PointPrompt,
    Tracker,
    encode_memory,
    plan_sweeps,
)
from .config import TrainConfig
from .data import Batch
from .losses import heads_loss
from .prompts import central_click, click_from_mask, correction_click, noisy_box

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

    # the pointer position encoding is normalised by min(stack length, 16): use the
    # value a full stack gives at inference
    tracker = Tracker(model, max(t_len, model.config.max_obj_ptrs_in_encoder))
    bank = MemoryBank()  # one row per object of the batch
    losses: List[torch.Tensor] = []
    parts_sum: Dict[str, float] = {}
    masks = torch.zeros(b, t_len, *targets.shape[-2:], dtype=torch.bool)

    def add_loss(heads: HeadsOutput, t: int) -> None:
        loss, parts = heads_loss(heads, targets[:, t], cfg)
        losses.append(loss)
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v

    def remember(t: int, heads: HeadsOutput, feats: FrameFeatures, *, prompted: bool, from_clicks: bool) -> None:
        mem = encode_memory(model, feats, heads.high_res_masks, heads.object_score_logits, from_clicks=from_clicks)
        bank.add(t, FrameOutput(None, heads.obj_ptr, heads.object_score_logits, mem), prompted=prompted)
        masks[:, t] = (heads.high_res_masks[:, 0] > 0).detach().cpu()

    def refined(heads: HeadsOutput) -> torch.Tensor:
        return heads.low_res_masks.detach().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)

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
        for _ in range(1 + (0 if central else batch.corrections)):
            prev = None
            if heads is not None:
                extra = correction_click(heads.high_res_masks.detach().cpu(), gt.cpu(), gen)
                prompt = prompt.extended(extra.coords.to(device), extra.labels.to(device))
                prev = refined(heads)
            heads = tracker.step(bank, f, p, first=True, prompt=prompt, prev_mask_logits=prev)
            add_loss(heads, p)
    remember(p, heads, f, prompted=True, from_clicks=binarize and kind != "mask")

    # as a session propagates "both" ways from the prompted slice
    for sweep in plan_sweeps({0: p}, {0: (0, t_len - 1)}, "both"):
        for t in sweep.frames:
            if t in bank.cond:  # the prompted slice keeps its result
                continue
            f = feats_at(t)
            heads = tracker.step(bank, f, t, reverse=sweep.reverse, use_pointers=use_pointers)
            add_loss(heads, t)
            prompted = t == batch.tracked_correction and not central
            if prompted:
                click = correction_click(heads.high_res_masks.detach().cpu(), targets[:, t].cpu(), gen)
                heads = tracker.step(
                    bank, f, t, reverse=sweep.reverse, prompt=PointPrompt(click.coords.to(device), click.labels.to(device)),
                    prev_mask_logits=refined(heads), use_pointers=use_pointers,
                )
                add_loss(heads, t)
            remember(t, heads, f, prompted=prompted, from_clicks=False)
    loss = torch.stack(losses).mean()
    parts = {k: v / len(losses) for k, v in parts_sum.items()}
    return ClipResult(loss, parts, masks)
