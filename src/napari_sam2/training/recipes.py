"""Recipes: named changes an experiment makes to the model it trains.

The trainer knows no experiment. A :class:`Recipe` is a set of hooks registered under a
name (:func:`register_recipe`); a run lists the names it uses in
:attr:`TrainConfig.recipes <napari_sam2.training.config.TrainConfig.recipes>`, and the
hooks run in that order. ``scripts/train_nano.py`` registers the recipes the bundled nano
model was trained with. The building blocks below (:func:`reinitialise`, :func:`freeze`,
:func:`normalise_embedding`) and the model parts' own methods
(``SAM2Model.scale_image_embedding``, ``MemoryAttention.bias_towards_same_place``,
``MemoryEncoder.use_mask_only``) are what hooks are made of.

Example::

    register_recipe("fresh memory path", Recipe(
        after_load=lambda model, seed: reinitialise(model, ("memory_attention", "memory_encoder"), seed),
        lr_scales=(("memory_encoder", 2.0),),
    ))
    train(TrainConfig(init="pretrained", recipes=("fresh memory path",)), stacks, "runs/x")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..model.config import SAM2Config, get_config
from ..model.errors import TrainingError
from ..model.sam2 import SAM2Model, build_model
from .config import TrainConfig
from .data import AnnotatedStack


@dataclass(frozen=True)
class Recipe:
    """Hooks of one experiment, all optional.

    after_load(model, seed): once the starting weights are in place (:func:`make_model`;
    random ones too, with ``init="scratch"``), e.g. to re-initialise a part; before_training(model, training stacks): on the training
    device, before the optimiser is built, e.g. to rescale or freeze parts; lr_scales:
    (parameter-name prefix, factor) pairs, the named parameters learning at factor x the
    learning rate.
    """

    after_load: Optional[Callable[[SAM2Model, int], None]] = None
    before_training: Optional[Callable[[SAM2Model, Sequence[AnnotatedStack]], None]] = None
    lr_scales: Tuple[Tuple[str, float], ...] = ()


RECIPES: Dict[str, Recipe] = {}


def register_recipe(name: str, recipe: Recipe) -> Recipe:
    """Make ``recipe`` usable as ``TrainConfig(recipes=(name,))`` (a later registration under
    the same name replaces it)."""
    if not isinstance(recipe, Recipe):
        raise TrainingError(f"recipe {name!r} must be a Recipe, got {type(recipe).__name__}")
    RECIPES[str(name)] = recipe
    return recipe


def recipes_of(cfg: TrainConfig) -> List[Recipe]:
    """The registered recipes a run names, in its order."""
    missing = [n for n in cfg.recipes if n not in RECIPES]
    if missing:
        known = ", ".join(sorted(RECIPES)) or "none"
        raise TrainingError(
            f"unknown training recipe {missing[0]!r} (registered: {known}); register it with "
            "napari_sam2.training.register_recipe before the run (scripts/train_nano.py registers the nano recipes)"
        )
    return [RECIPES[n] for n in cfg.recipes]


# ---------------------------------------------------------------------- applying them


def make_model(cfg: TrainConfig) -> SAM2Model:
    """The model a run starts from (random, the model's default weights, or a file), after
    its recipes' ``after_load`` hooks."""
    from ..model.checkpoint import load_model

    recipes = recipes_of(cfg)
    model_cfg: SAM2Config = get_config(cfg.model)
    if cfg.image_size is not None:
        model_cfg = model_cfg.with_image_size(cfg.image_size)
    if cfg.init == "scratch":
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg)
    elif cfg.init == "pretrained":
        model = load_model(cfg.model, image_size=cfg.image_size)
    else:
        model = load_model(cfg.model, cfg.init, image_size=cfg.image_size)
    for r in recipes:
        if r.after_load is not None:
            r.after_load(model, cfg.seed)
    return model


def prepare_model(model: SAM2Model, cfg: TrainConfig, stacks: Sequence[AnnotatedStack] = ()) -> List[Tuple[str, float]]:
    """Run the recipes' ``before_training`` hooks on ``model``; returns their learning-rate
    scales, each prefix checked to name a parameter."""
    scales: List[Tuple[str, float]] = []
    for r in recipes_of(cfg):
        if r.before_training is not None:
            r.before_training(model, stacks)
        scales += list(r.lr_scales)
    require_prefixes(model, [prefix for prefix, _ in scales], "lr_scales")
    return scales


# ---------------------------------------------------------------------- building blocks


def require_prefixes(model: SAM2Model, prefixes: Sequence[str], what: str) -> None:
    """Refuse a parameter-name prefix that names no parameter (``what`` says whose)."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise TrainingError(f"{what}: no parameter name starts with {prefix!r}")


def reinitialise(model: SAM2Model, prefixes: Sequence[str], seed: int) -> SAM2Model:
    """Replace the parameters and buffers whose names start with one of ``prefixes``
    by those of a freshly built model (seeded); the rest is kept."""
    if not prefixes:
        return model
    state = model.state_dict()
    chosen = [k for k in state if k.startswith(tuple(prefixes))]
    if not chosen:
        raise TrainingError(f"reinitialise: no parameter name starts with {', '.join(prefixes)}")
    torch.manual_seed(seed)
    fresh = build_model(model.config).state_dict()
    state.update({k: fresh[k].to(state[k].device, state[k].dtype) for k in chosen})
    model.load_state_dict(state)
    return model


def freeze(model: SAM2Model, prefixes: Sequence[str]) -> None:
    """Keep the parameters whose names start with one of ``prefixes`` fixed during the run."""
    require_prefixes(model, prefixes, "freeze")
    for name, prm in model.named_parameters():
        if name.startswith(tuple(prefixes)):
            prm.requires_grad_(False)


def normalise_embedding(model: SAM2Model, stacks: Sequence[AnnotatedStack], norm: float) -> float:
    """Rescale the image embedding to a mean token norm of ``norm``, measured on the middle
    slices of up to 8 of ``stacks``; returns the factor applied. (A backbone trained from
    scratch lets the norm grow without bound, which drowns the position encoding of the
    memory attention's queries.)"""
    if not stacks:
        raise TrainingError("normalising the image embedding needs training stacks to measure it on")
    # middle slices, grey ones repeated to 3 channels
    frames = torch.stack([s.frames[len(s) // 2].float().expand(3, -1, -1) for s in list(stacks)[:8]])
    frames = frames.to(model.device)
    with torch.no_grad():
        measured = float(model.frame_features(model.normalize(frames)).image_embed.norm(dim=1).mean())
    factor = norm / max(measured, 1e-12)
    model.scale_image_embedding(factor)
    return factor
