"""One tracking step of SAM 2: memory selection, memory attention, SAM heads, memory encoding.

These functions hold the model's rules; :mod:`.video` holds the session state.
Semantics follow Meta's reference video predictor (``sam2==1.1.0``) built with
its default post-processing: single-mask outputs fall back to the most
confident multimask output when unstable, masks from clicks are binarised
before they enter the memory, memories are stored in bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

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


def select_memories(
    model: SAM2Model,
    frame_idx: int,
    cond: Dict[int, FrameOutput],
    non_cond: Dict[int, FrameOutput],
    reverse: bool,
) -> List[Tuple[int, FrameOutput]]:
    """(temporal position, output) of the spatial memories a frame attends to.

    All conditioning frames (position 0), then the last num_maskmem - 1 frames
    in the direction of travel (positions 1..num_maskmem-1, nearest last).
    """
    chosen = [(0, out) for out in cond.values()]
    n = model.num_maskmem
    for t_pos in range(1, n):
        t_rel = n - t_pos  # frames back along the direction of travel
        prev = frame_idx + t_rel if reverse else frame_idx - t_rel
        out = non_cond.get(prev)
        if out is not None and out.maskmem_features is not None:
            chosen.append((t_pos, out))
    return chosen


def select_pointers(
    model: SAM2Model,
    frame_idx: int,
    cond: Dict[int, FrameOutput],
    non_cond: Dict[int, FrameOutput],
    reverse: bool,
    num_frames: int,
) -> Tuple[List[int], List[torch.Tensor], int]:
    """Object pointers a frame attends to: (signed/abs distances, pointers, max distance)."""
    cfg = model.config
    max_ptrs = min(num_frames, cfg.max_obj_ptrs_in_encoder)
    sign = -1 if reverse else 1
    pos, ptrs = [], []
    for t, out in cond.items():  # only conditioning frames "in the past"
        if (t >= frame_idx) if reverse else (t <= frame_idx):
            pos.append((frame_idx - t) * sign if cfg.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t))
            ptrs.append(out.obj_ptr)
    for t_diff in range(1, max_ptrs):
        t = frame_idx + t_diff if reverse else frame_idx - t_diff
        if t < 0 or t >= num_frames:
            break
        out = non_cond.get(t)
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


def gather_memory(
    model: SAM2Model,
    feats: FrameFeatures,
    frame_idx: int,
    cond: Dict[int, FrameOutput],
    non_cond: Dict[int, FrameOutput],
    maskmem_pos: torch.Tensor,
    reverse: bool,
    num_frames: int,
    use_pointers: bool = True,
) -> Memory:
    """Spatial memories and object pointers of one object for one frame, as tokens."""
    x = feats.image_embed
    c = x.shape[1]
    device = x.device
    mems, mem_pos = [], []
    for t_pos, out in select_memories(model, frame_idx, cond, non_cond, reverse):
        # stored in bfloat16; promoted explicitly (the reference relies on torch.cat
        # promotion, which fails on float32 when no object pointer joins the memory)
        m = out.maskmem_features.to(device=device, dtype=x.dtype if x.dtype != torch.bfloat16 else torch.float32)
        mems.append(m.flatten(2).transpose(1, 2))  # 1 hw mem_dim
        tpos = model.maskmem_tpos_enc[model.num_maskmem - t_pos - 1].view(1, 1, -1)
        mem_pos.append(maskmem_pos + tpos)
    pos, ptrs, max_ptrs = (
        select_pointers(model, frame_idx, cond, non_cond, reverse, num_frames) if use_pointers else ([], [], 0)
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


def attend_to_memory(model: SAM2Model, feats: FrameFeatures, memories: List[Memory]) -> torch.Tensor:
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
    out = model.memory_attention(curr, curr_pos, memory.expand(b, -1, -1), memory_pos.expand(b, -1, -1),
                                 num_obj_ptr_tokens=memories[0].num_ptr_tokens)
    return out.transpose(1, 2).reshape(b, c, h, w)


def memory_conditioned_features(
    model: SAM2Model,
    feats: FrameFeatures,
    frame_idx: int,
    is_init_cond_frame: bool,
    cond: Dict[int, FrameOutput],
    non_cond: Dict[int, FrameOutput],
    maskmem_pos: torch.Tensor,
    reverse: bool,
    num_frames: int,
    use_pointers: bool = True,
) -> torch.Tensor:
    """The frame's lowest-level features after attending to the memory bank: B C h w.

    use_pointers=False leaves the object pointers out (a training regulariser only).
    """
    x = feats.image_embed  # B C h w
    if is_init_cond_frame:  # nothing to remember yet
        return x + model.no_mem_embed.view(1, x.shape[1], 1, 1)
    mem = gather_memory(model, feats, frame_idx, cond, non_cond, maskmem_pos, reverse, num_frames, use_pointers)
    return attend_to_memory(model, feats, [mem])


def track_objects(
    model: SAM2Model,
    feats: FrameFeatures,
    frame_idx: int,
    banks: List[Tuple[Dict[int, FrameOutput], Dict[int, FrameOutput]]],
    maskmem_pos: torch.Tensor,
    reverse: bool,
    num_frames: int,
) -> Tuple[HeadsOutput, torch.Tensor]:
    """Track several objects on one frame from their memories, in batches.

    banks: one (cond, non_cond) memory bank per object. Objects whose memories have
    the same layout go through memory attention together; the SAM heads and the
    memory encoder then take all of them as one batch. Returns the heads' output
    and the new memories (B mem_dim h w), one row per object in the order given.
    """
    memories = [gather_memory(model, feats, frame_idx, c, n, maskmem_pos, reverse, num_frames) for c, n in banks]
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, m in enumerate(memories):
        groups.setdefault(m.layout, []).append(i)
    pix = [None] * len(memories)
    for rows in groups.values():
        out = attend_to_memory(model, feats, [memories[i] for i in rows])
        for j, i in enumerate(rows):
            pix[i] = out[j : j + 1]
    heads = model.forward_sam_heads(
        torch.cat(pix) if len(pix) > 1 else pix[0],
        high_res_features=feats.high_res,
        multimask_output=use_multimask(model, False, None),
    )
    mem = encode_memory(model, feats, heads.high_res_masks, heads.object_score_logits, from_clicks=False)
    return heads, mem


def use_multimask(model: SAM2Model, is_init_cond_frame: bool, prompt: Optional[PointPrompt]) -> bool:
    """Multimask output for zero or one click (box corners count as clicks)."""
    num_pts = 0 if prompt is None else prompt.labels.shape[1]
    return 0 <= num_pts <= 1


def track_step(
    model: SAM2Model,
    feats: FrameFeatures,
    frame_idx: int,
    *,
    is_init_cond_frame: bool,
    prompt: Optional[PointPrompt],
    mask_input: Optional[torch.Tensor],
    cond: Dict[int, FrameOutput],
    non_cond: Dict[int, FrameOutput],
    maskmem_pos: torch.Tensor,
    reverse: bool,
    num_frames: int,
    prev_mask_logits: Optional[torch.Tensor] = None,
    use_pointers: bool = True,
) -> HeadsOutput:
    """Segment one object on one frame from its prompt and/or its memory."""
    if mask_input is not None:  # a mask prompt is taken as the output directly
        return model.mask_as_output(feats, mask_input)
    pix = memory_conditioned_features(
        model, feats, frame_idx, is_init_cond_frame, cond, non_cond, maskmem_pos, reverse, num_frames,
        use_pointers=use_pointers,
    )
    return model.forward_sam_heads(
        pix,
        point_coords=None if prompt is None else prompt.coords,
        point_labels=None if prompt is None else prompt.labels,
        mask_inputs=prev_mask_logits,
        high_res_features=feats.high_res,
        multimask_output=use_multimask(model, is_init_cond_frame, prompt),
    )


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
