"""SAM 2's tracking rules, written once for inference and training: the memory bank of an
object, the order slices are visited in, and one tracking step (memory selection, memory
attention, SAM heads, memory encoding).

A :class:`Tracker` applies the rules of one model to a stack; a :class:`MemoryBank` holds
what one object (or a batch of objects tracked in step, as in a training clip) remembers;
:func:`plan_sweeps` orders the slices. :class:`~.video.StackSession` (interactive, many
objects, memories pruned as it goes) and :func:`~napari_sam2.training.clip.run_clip`
(differentiable, losses on every output) are both built on them.
Semantics follow Meta's reference video predictor (``sam2==1.1.0``) built with
its default post-processing: single-mask outputs fall back to the most
confident multimask output when unstable, masks from clicks are binarised
before they enter the memory, memories are stored in bfloat16.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .common import sine_position_encoding_1d
from .sam2 import FrameFeatures, HeadsOutput, SAM2Model


@dataclass
class FrameOutput:
    """What a tracked frame leaves behind for one object.

    pred_masks: 1 1 4h 4w logits (after hole filling), None once pruned;
    obj_ptr: 1 C object pointer; object_score_logits: 1 1;
    maskmem_features: 1 mem_dim h w bfloat16 memory, None until encoded or once pruned.
    """

    pred_masks: Optional[torch.Tensor]
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor
    maskmem_features: Optional[torch.Tensor] = None

    @property
    def nbytes(self) -> int:
        ts = [t for t in (self.pred_masks, self.obj_ptr, self.object_score_logits, self.maskmem_features) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


@dataclass
class PointPrompt:
    """Clicks (and box corners) of one object on one frame, in model-input pixels.

    coords 1 P 2 (x, y), labels 1 P (1, 0, or 2 / 3 for box corners).
    """

    coords: torch.Tensor
    labels: torch.Tensor

    def extended(self, coords: torch.Tensor, labels: torch.Tensor) -> "PointPrompt":
        return PointPrompt(torch.cat([self.coords, coords], dim=1), torch.cat([self.labels, labels], dim=1))


@dataclass
class MemoryBank:
    """What one object remembers (or a batch of objects tracked in step: each output then has
    one row per object): the outputs of its prompted ("conditioning") slices and of its
    tracked slices, by slice index. A prompted slice keeps its output: a tracked result on
    it is not stored."""

    cond: Dict[int, FrameOutput] = field(default_factory=dict)
    non_cond: Dict[int, FrameOutput] = field(default_factory=dict)

    def add(self, frame: int, out: FrameOutput, *, prompted: bool) -> None:
        """Store a slice's output: as a prompted slice (replacing a tracked one there) or as
        a tracked one."""
        if prompted:
            self.cond[frame] = out
            self.non_cond.pop(frame, None)
        elif frame not in self.cond:
            self.non_cond[frame] = out

    def get(self, frame: int) -> Optional[FrameOutput]:
        """The output stored for a slice (prompted first), or None."""
        out = self.cond.get(frame)
        return out if out is not None else self.non_cond.get(frame)

    def outputs(self) -> List[FrameOutput]:
        return [*self.cond.values(), *self.non_cond.values()]

    def clear(self) -> None:
        self.cond.clear()
        self.non_cond.clear()

    def copy(self) -> "MemoryBank":
        """A copy whose tables and outputs can change without touching this one (pruning
        edits an output in place)."""
        return MemoryBank({t: dataclasses.replace(o) for t, o in self.cond.items()},
                          {t: dataclasses.replace(o) for t, o in self.non_cond.items()})

    def forget_behind(self, frame: int, reverse: bool, window: int) -> None:
        """Drop the memories of tracked slices the model can no longer attend to: behind
        ``frame`` in the direction of travel by more than ``window`` slices, and not within
        ``window`` of a prompted slice (their output's object pointer is kept)."""
        limit = frame + window if reverse else frame - window
        for t, out in self.non_cond.items():
            behind = t > limit if reverse else t < limit
            if behind and out.maskmem_features is not None and not any(abs(t - c) <= window for c in self.cond):
                out.maskmem_features = None
                out.pred_masks = None


def select_memories(model: SAM2Model, frame_idx: int, bank: MemoryBank, reverse: bool) -> List[Tuple[int, FrameOutput]]:
    """(temporal position, output) of the spatial memories a frame attends to.

    All conditioning frames (position 0), then the last num_maskmem - 1 frames
    in the direction of travel (positions 1..num_maskmem-1, nearest last).
    """
    chosen = [(0, out) for out in bank.cond.values()]
    n = model.num_maskmem
    for t_pos in range(1, n):
        t_rel = n - t_pos  # frames back along the direction of travel
        prev = frame_idx + t_rel if reverse else frame_idx - t_rel
        out = bank.non_cond.get(prev)
        if out is not None and out.maskmem_features is not None:
            chosen.append((t_pos, out))
    return chosen


def select_pointers(
    model: SAM2Model, frame_idx: int, bank: MemoryBank, reverse: bool, num_frames: int
) -> Tuple[List[int], List[torch.Tensor], int]:
    """Object pointers a frame attends to: (signed/abs distances, pointers, max distance)."""
    cfg = model.config
    max_ptrs = min(num_frames, cfg.max_obj_ptrs_in_encoder)
    sign = -1 if reverse else 1
    pos, ptrs = [], []
    for t, out in bank.cond.items():  # only conditioning frames "in the past"
        if (t >= frame_idx) if reverse else (t <= frame_idx):
            pos.append((frame_idx - t) * sign if cfg.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t))
            ptrs.append(out.obj_ptr)
    for t_diff in range(1, max_ptrs):
        t = frame_idx + t_diff if reverse else frame_idx - t_diff
        if t < 0 or t >= num_frames:
            break
        out = bank.non_cond.get(t)
        if out is not None:
            pos.append(t_diff)
            ptrs.append(out.obj_ptr)
    return pos, ptrs, max_ptrs


@dataclass
class Memory:
    """The memory one object attends to on one frame.

    tokens / pos: 1 M mem_dim (spatial memories first, then object-pointer tokens);
    num_ptr_tokens: how many of the last tokens are object pointers (no RoPE).
    """

    tokens: torch.Tensor
    pos: torch.Tensor
    num_ptr_tokens: int

    @property
    def layout(self) -> Tuple[int, int]:
        """(tokens, pointer tokens): memories with the same layout can share a batch."""
        return self.tokens.shape[1], self.num_ptr_tokens


def use_multimask(model: SAM2Model, is_init_cond_frame: bool, prompt: Optional[PointPrompt]) -> bool:
    """Multimask output for zero or one click (box corners count as clicks)."""
    num_pts = 0 if prompt is None else prompt.labels.shape[1]
    return 0 <= num_pts <= 1


class Tracker:
    """The tracking rules of one model on a stack of ``num_frames`` slices.

    window: how many slices back a tracked slice's memory can still be attended to (memory
    frames and object pointers), for :meth:`MemoryBank.forget_behind`.
    """

    def __init__(self, model: SAM2Model, num_frames: int) -> None:
        self.model = model
        self.num_frames = int(num_frames)
        self.window = max(model.num_maskmem, model.config.max_obj_ptrs_in_encoder)
        self._maskmem_pos: Optional[torch.Tensor] = None

    def maskmem_pos(self, feats: FrameFeatures) -> torch.Tensor:
        """Position encoding of the memory tokens of one frame: 1 hw mem_dim (computed once)."""
        if self._maskmem_pos is None:
            self._maskmem_pos = maskmem_pos_tokens(self.model, feats)
        return self._maskmem_pos

    def memory(
        self, bank: MemoryBank, feats: FrameFeatures, frame_idx: int, reverse: bool, use_pointers: bool = True
    ) -> Memory:
        """Spatial memories and object pointers of one bank for one frame, as tokens."""
        model = self.model
        x = feats.image_embed
        c = x.shape[1]
        device = x.device
        maskmem_pos = self.maskmem_pos(feats)
        mems, mem_pos = [], []
        for t_pos, out in select_memories(model, frame_idx, bank, reverse):
            # stored in bfloat16; promoted explicitly (the reference relies on torch.cat
            # promotion, which fails on float32 when no object pointer joins the memory)
            m = out.maskmem_features.to(device=device, dtype=x.dtype if x.dtype != torch.bfloat16 else torch.float32)
            mems.append(m.flatten(2).transpose(1, 2))  # 1 hw mem_dim
            tpos = model.maskmem_tpos_enc[model.num_maskmem - t_pos - 1].view(1, 1, -1)
            mem_pos.append(maskmem_pos + tpos)
        pos, ptrs, max_ptrs = (
            select_pointers(model, frame_idx, bank, reverse, self.num_frames) if use_pointers else ([], [], 0)
        )
        num_ptr_tokens = 0
        if ptrs:
            cfg = model.config
            obj_ptrs = torch.stack([p.to(device) for p in ptrs], dim=1)  # 1 P C (B P C in training clips)
            nb = obj_ptrs.shape[0]
            if cfg.add_tpos_enc_to_obj_ptrs:
                tpos_dim = c if cfg.proj_tpos_enc_in_obj_ptrs else model.mem_dim
                rel = torch.tensor(pos, device=device, dtype=torch.float32) / (max_ptrs - 1)
                ptr_pos = model.obj_ptr_tpos_proj(sine_position_encoding_1d(rel, tpos_dim)).unsqueeze(0)  # 1 P mem_dim
            else:
                ptr_pos = obj_ptrs.new_zeros(1, len(ptrs), model.mem_dim)
            split = c // model.mem_dim
            if split > 1:  # each pointer becomes `split` tokens of mem_dim channels
                obj_ptrs = obj_ptrs.reshape(nb, len(ptrs), split, model.mem_dim).flatten(1, 2)
                ptr_pos = ptr_pos.repeat_interleave(split, dim=1)
            mems.append(obj_ptrs)
            mem_pos.append(ptr_pos)
            num_ptr_tokens = obj_ptrs.shape[1]
        batch = max(t.shape[0] for t in mems + mem_pos)
        mems = [t.expand(batch, -1, -1) for t in mems]
        mem_pos = [t.expand(batch, -1, -1) for t in mem_pos]
        # bfloat16 memories are promoted by the concatenation
        return Memory(torch.cat(mems, dim=1), torch.cat(mem_pos, dim=1), num_ptr_tokens)

    def attend(self, feats: FrameFeatures, memories: List[Memory]) -> torch.Tensor:
        """The frame's lowest-level features after attending to each memory: B C h w, one row
        per memory (or per frame of a training batch, each with its own memory). All memories
        must have the same layout (see :attr:`Memory.layout`)."""
        x = feats.image_embed  # 1 C h w, or B C h w
        _, c, h, w = x.shape
        if len({m.layout for m in memories}) != 1:
            raise ValueError("memories of different layouts cannot share a batch")
        memory = torch.cat([m.tokens for m in memories])
        memory_pos = torch.cat([m.pos for m in memories])
        b = max(memory.shape[0], x.shape[0])
        curr = x.flatten(2).transpose(1, 2).expand(b, -1, -1)  # B hw C
        curr_pos = feats.pos.flatten(2).transpose(1, 2).expand(b, -1, -1)
        out = self.model.memory_attention(curr, curr_pos, memory.expand(b, -1, -1), memory_pos.expand(b, -1, -1),
                                          num_obj_ptr_tokens=memories[0].num_ptr_tokens)
        return out.transpose(1, 2).reshape(b, c, h, w)

    def step(
        self,
        bank: MemoryBank,
        feats: FrameFeatures,
        frame_idx: int,
        *,
        reverse: bool = False,
        first: bool = False,
        prompt: Optional[PointPrompt] = None,
        mask_input: Optional[torch.Tensor] = None,
        prev_mask_logits: Optional[torch.Tensor] = None,
        use_pointers: bool = True,
    ) -> HeadsOutput:
        """Segment one bank's object(s) on one frame from a prompt and/or the memory.

        first: the object's first prompt (nothing to remember yet); mask_input: a mask
        prompt (1 1 S S), taken as the output directly; prev_mask_logits: the frame's
        earlier logits, refined by the prompt; use_pointers=False leaves the object
        pointers out of the memory (a training regulariser only).
        """
        model = self.model
        if mask_input is not None:
            return model.mask_as_output(feats, mask_input)
        x = feats.image_embed  # B C h w
        if first:
            pix = x + model.no_mem_embed.view(1, x.shape[1], 1, 1)
        else:
            pix = self.attend(feats, [self.memory(bank, feats, frame_idx, reverse, use_pointers)])
        return model.forward_sam_heads(
            pix,
            point_coords=None if prompt is None else prompt.coords,
            point_labels=None if prompt is None else prompt.labels,
            mask_inputs=prev_mask_logits,
            high_res_features=feats.high_res,
            multimask_output=use_multimask(model, first, prompt),
        )

    def step_many(
        self, banks: Sequence[MemoryBank], feats: FrameFeatures, frame_idx: int, reverse: bool
    ) -> Tuple[HeadsOutput, torch.Tensor]:
        """Track several objects on one frame from their memories, in batches.

        Objects whose memories have the same layout go through memory attention together;
        the SAM heads and the memory encoder then take all of them as one batch. Returns the
        heads' output and the new memories (B mem_dim h w), one row per bank in the order given.
        """
        memories = [self.memory(bank, feats, frame_idx, reverse) for bank in banks]
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, m in enumerate(memories):
            groups.setdefault(m.layout, []).append(i)
        pix = [None] * len(memories)
        for rows in groups.values():
            out = self.attend(feats, [memories[i] for i in rows])
            for j, i in enumerate(rows):
                pix[i] = out[j : j + 1]
        heads = self.model.forward_sam_heads(
            torch.cat(pix) if len(pix) > 1 else pix[0],
            high_res_features=feats.high_res,
            multimask_output=use_multimask(self.model, False, None),
        )
        mem = encode_memory(self.model, feats, heads.high_res_masks, heads.object_score_logits, from_clicks=False)
        return heads, mem


@dataclass
class Sweep:
    """One pass through the stack in one direction.

    starts: {obj_id: the slice where the object begins}; ends: {obj_id: the last slice
    it may reach}. Objects join the sweep at their start, so each is tracked only from
    its own anchor, and all objects on a slice step together.
    """

    reverse: bool
    starts: Dict[int, int]
    ends: Dict[int, int]

    @property
    def frames(self) -> List[int]:
        if self.reverse:
            return list(range(max(self.starts.values()), min(self.ends.values()) - 1, -1))
        return list(range(min(self.starts.values()), max(self.ends.values()) + 1))

    def active(self, frame: int, obj_id: int) -> bool:
        s, e = self.starts[obj_id], self.ends[obj_id]
        return e <= frame <= s if self.reverse else s <= frame <= e


def plan_sweeps(anchors: Dict[int, int], limits: Dict[int, Tuple[int, int]], direction: str) -> List[Sweep]:
    """The sweeps that track each object from its anchor within its (first, last) limits:
    forward from the anchor, backward from it ("backward"), or backward from the slice
    before it ("both", whose forward sweep already gave the anchor)."""
    sweeps = []
    if direction in ("forward", "both"):
        sweeps.append(Sweep(False, dict(anchors), {i: limits[i][1] for i in anchors}))
    if direction in ("backward", "both"):
        first = {i: a - (1 if direction == "both" else 0) for i, a in anchors.items()}
        first = {i: f for i, f in first.items() if f >= limits[i][0]}
        if first:
            sweeps.append(Sweep(True, first, {i: limits[i][0] for i in first}))
    return sweeps


def encode_memory(
    model: SAM2Model,
    feats: FrameFeatures,
    high_res_masks: torch.Tensor,
    object_score_logits: torch.Tensor,
    *,
    from_clicks: bool,
) -> torch.Tensor:
    """Memory of a frame's mask: B mem_dim h w (float; callers store it in bfloat16).

    high_res_masks: B 1 S S logits. Masks that come from clicks are binarised so
    that the memory holds exactly what the user saw.
    """
    cfg = model.config
    mask = (high_res_masks > 0).float() if from_clicks else torch.sigmoid(high_res_masks)
    mask = mask * cfg.sigmoid_scale_for_mem_enc + cfg.sigmoid_bias_for_mem_enc
    features, _ = model.memory_encoder(feats.image_embed, mask)
    if model.no_obj_embed_spatial is not None:
        absent = (object_score_logits <= 0).float()  # B 1
        features = features + absent[..., None, None] * model.no_obj_embed_spatial[..., None, None]
    return features


def maskmem_pos_tokens(model: SAM2Model, feats: FrameFeatures) -> torch.Tensor:
    """Position encoding of the memory tokens of one frame: 1 hw mem_dim."""
    h, w = feats.image_embed.shape[-2:]
    probe = feats.image_embed.new_zeros(1, model.mem_dim, h, w)
    pos = model.memory_encoder.position_encoding(probe)  # 1 mem_dim h w
    return pos.flatten(2).transpose(1, 2).contiguous()


def upsample_to_model(model: SAM2Model, low_res: torch.Tensor) -> torch.Tensor:
    """B 1 4h 4w logits -> B 1 S S (bilinear)."""
    return F.interpolate(low_res, size=(model.image_size, model.image_size), mode="bilinear", align_corners=False)
