"""The training loop: :class:`Trainer` (steps, validation, checkpoints that resume exactly), its progress events and :func:`train`."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..files import atomic_write_text
from ..model.checkpoint import atomic_save
from ..model.errors import TrainingError
from ..model.metrics import dice_per_row
from ..model.sam2 import SAM2Model
from .clip import run_clip
from .config import TrainConfig
from .data import AnnotatedStack, Batch, sample_batch, split_stacks
from .recipes import make_model, prepare_model

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
        lr_scales = prepare_model(self.model, cfg, self.train_stacks)
        size = self.model.image_size
        for s in self.train_stacks + self.val_stacks:
            if s.frames.shape[-1] != size or s.labels.shape[-1] != size:
                raise TrainingError(f"stack {s.name!r} was prepared at {s.frames.shape[-1]} px, the model takes {size} px")
        groups: Dict[Tuple[bool, float], List[torch.nn.Parameter]] = {}
        for name, prm in self.model.named_parameters():
            no_decay = prm.ndim <= 1 or "pos_embed" in name or name.endswith(
                ("tpos_enc", "_embed", "no_obj_ptr", "embed_spatial"))
            scale = next((f for prefix, f in lr_scales if name.startswith(prefix)), 1.0)
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
        from ..model.devices import autocast_context

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
