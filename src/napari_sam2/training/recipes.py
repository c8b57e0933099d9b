"""Model surgery for experiments: building the model to train, re-initialising parts of it and adapting it to a recipe's options."""

from __future__ import annotations

from typing import Sequence

import torch

from ..model.config import SAM2Config, get_config
from ..model.errors import TrainingError
from ..model.sam2 import SAM2Model, build_model
from .config import TrainConfig
from .data import AnnotatedStack


def make_model(cfg: TrainConfig) -> SAM2Model:
    """The model a run starts from: random, the model's default weights, or a file."""
    from ..model.checkpoint import load_model

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
        model.scale_image_embedding(cfg.embed_norm / max(norm, 1e-12))
    if cfg.local_memory_init > 0:
        model.memory_attention.bias_towards_same_place(cfg.local_memory_init)
    _require_prefixes(model, cfg.freeze, "freeze")
    for name, prm in model.named_parameters():
        if name.startswith(tuple(cfg.freeze)):
            prm.requires_grad_(False)
    if cfg.mask_only_memory:
        model.memory_encoder.use_mask_only()
    return model


