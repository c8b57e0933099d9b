"""Training: prompt simulation, losses, data preparation, determinism, resuming, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam2.model.config import NANO
from napari_sam2.model.preprocess import InputError
from napari_sam2.model.sam2 import FrameFeatures
from napari_sam2.sample_data import random_stack
from napari_sam2.training import (
    RECIPES,
    AnnotatedStack,
    Recipe,
    TrainConfig,
    Trainer,
    TrainingError,
    central_click,
    click_from_mask,
    correction_click,
    freeze,
    make_model,
    mask_losses,
    noisy_box,
    prepare_stack,
    register_recipe,
    reinitialise,
    sample_batch,
    split_stacks,
)

SIZE = 128  # the nano architecture at 128 px keeps CI steps short


def _disc(side, cy, cx, r):
    yy, xx = np.mgrid[:side, :side]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# ------------------------------------------------------------------ prompts


def test_click_from_mask_lands_inside():
    gt = torch.from_numpy(np.stack([_disc(32, 10, 20, 4), _disc(32, 25, 5, 2)]))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = click_from_mask(gt, gen)
        assert p.labels.tolist() == [[1], [1]]
        for b in range(2):
            x, y = p.coords[b, 0].long().tolist()
            assert gt[b, y, x]


def test_central_click_is_the_disc_centre():
    gt = torch.from_numpy(np.stack([_disc(40, 12, 30, 6), _disc(40, 27, 9, 5)]))
    p = central_click(gt)
    assert p.coords[:, 0].tolist() == [[30.0, 12.0], [9.0, 27.0]]


def test_box_without_jitter_is_the_bounding_box():
    gt = torch.zeros(1, 20, 20, dtype=torch.bool)
    gt[0, 3:9, 5:16] = True  # rows 3..8, columns 5..15
    p = noisy_box(gt, torch.Generator().manual_seed(0), jitter=0.0)
    assert p.coords[0].tolist() == [[5.0, 3.0], [15.0, 8.0]]
    assert p.labels.tolist() == [[2, 3]]
    jittered = noisy_box(gt, torch.Generator().manual_seed(1), jitter=0.1)
    assert (jittered.coords[0] - p.coords[0]).abs().max() <= 0.1 * 11 + 1e-6


def test_correction_click_samples_the_error_region():
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[:, 4:12, 4:12] = True
    logits = torch.full((2, 1, 16, 16), -5.0)
    logits[0, 0, 4:12, 4:8] = 5.0  # object 0: right half missing -> positive clicks there
    logits[1, 0, :, :] = 5.0  # object 1: everything predicted -> negative clicks outside
    logits[1, 0, 4:12, 4:12] = 5.0
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        p = correction_click(logits, gt, gen)
        (x0, y0), (x1, y1) = p.coords[0, 0].long().tolist(), p.coords[1, 0].long().tolist()
        assert p.labels[0, 0] == 1 and 4 <= y0 < 12 and 8 <= x0 < 12
        assert p.labels[1, 0] == 0 and not gt[1, y1, x1]


# ------------------------------------------------------------------ losses


def test_mask_losses_match_a_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (2, 3, 8, 8))
    t = rng.random((2, 8, 8)) < 0.4
    focal, dice = mask_losses(torch.tensor(x, dtype=torch.float32), torch.from_numpy(t))
    for b in range(2):
        for m in range(3):
            xi, ti = x[b, m].ravel(), t[b].ravel().astype(float)
            p = 1 / (1 + np.exp(-xi))
            ce = -(ti * np.log(p) + (1 - ti) * np.log(1 - p))
            pt = np.where(ti == 1, p, 1 - p)
            alpha = np.where(ti == 1, 0.25, 0.75)
            assert focal[b, m].item() == pytest.approx(np.mean(alpha * (1 - pt) ** 2 * ce), rel=1e-4)
            d = 1 - (2 * (p * ti).sum() + 1) / (p.sum() + ti.sum() + 1)
            assert dice[b, m].item() == pytest.approx(d, rel=1e-4)


# ------------------------------------------------------------------ data


def test_prepare_stack_resizes_and_checks():
    image, labels = random_stack(4, kind="nuclei", size=160)
    s = prepare_stack(image, labels, SIZE)
    assert s.frames.shape == (len(image), 1, SIZE, SIZE) and s.frames.dtype == torch.float16
    assert 0 <= float(s.frames.min()) and float(s.frames.max()) <= 1
    assert s.labels.shape == (len(image), SIZE, SIZE)
    assert set(np.unique(s.labels.numpy())) <= set(np.unique(labels))  # nearest: no new ids
    with pytest.raises(InputError, match="must match"):
        prepare_stack(image, labels[:, :-1], SIZE)
    with pytest.raises(InputError, match="integer instance ids"):
        prepare_stack(image, labels + 0.5, SIZE)
    with pytest.raises(InputError, match="all background"):
        prepare_stack(image, np.zeros_like(labels), SIZE)


def test_split_keeps_whole_stacks_or_cuts_a_single_one():
    stacks = [AnnotatedStack(torch.zeros(10, 1, 4, 4), torch.ones(10, 4, 4, dtype=torch.int32), f"s{i}") for i in range(5)]
    tr, va = split_stacks(stacks, 0.2, seed=0)
    assert len(tr) == 4 and len(va) == 1 and {s.name for s in tr + va} == {f"s{i}" for i in range(5)}
    tr, va = split_stacks(stacks[:1], 0.2, seed=0)
    assert (len(tr[0]), len(va[0])) == (8, 2)
    with pytest.raises(TrainingError, match="no training data"):
        split_stacks([], 0.2, seed=0)


def test_batches_follow_the_labels():
    stacks = [prepare_stack(*random_stack(s, kind="nuclei", size=SIZE), SIZE) for s in (1, 2)]
    cfg = TrainConfig(clip_length=5, clips_per_step=2, objects_per_clip=3, min_area=12)
    batch = sample_batch(stacks, cfg, np.random.default_rng(0))
    assert batch.images.shape == (2, 5, 3, SIZE, SIZE)
    b = batch.targets.shape[0]
    assert batch.targets.shape == (b, 5, SIZE, SIZE) and 2 <= b <= 6
    # every object is present (and big enough) on the prompted slice
    assert (batch.targets[:, batch.prompt_frame].flatten(1).sum(1) >= cfg.min_area).all()


# ------------------------------------------------------------------ training runs


def _small_run(tmp_path, **changes):
    cfg = TrainConfig(
        model=NANO.name, image_size=SIZE, clip_length=4, clips_per_step=2, objects_per_clip=2,
        epochs=1, steps_per_epoch=4, warmup_steps=2, val_clips=2, seed=5,
    ).replace(**changes)
    stacks = [prepare_stack(*random_stack(s, kind="nuclei", size=SIZE), SIZE, name=str(s)) for s in (11, 12, 13)]
    return cfg, stacks[:2], stacks[2:]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg, tr, va = _small_run(tmp_path, epochs=2, steps_per_epoch=2)
    straight = Trainer(cfg, tr, va, tmp_path / "a")
    list(straight.run())
    first = Trainer(cfg, tr, va, tmp_path / "b")
    for ev in first.run():
        if ev.kind == "epoch" and ev.epoch == 1:
            break  # stopped after the first epoch's checkpoint
    resumed = Trainer(cfg, tr, va, tmp_path / "b")
    resumed.resume()
    assert resumed.step == 2
    list(resumed.run())
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_dice"] for h in straight.history] == [h["val_dice"] for h in resumed.history]
    # and the weights file it writes loads as the model
    from napari_sam2.model.checkpoint import load_model

    load_model(NANO.name, tmp_path / "b" / "weights.pt", image_size=SIZE)


def test_resume_refuses_other_files(tmp_path):
    cfg, tr, va = _small_run(tmp_path)
    t = Trainer(cfg, tr, va, tmp_path)
    with pytest.raises(TrainingError, match="no checkpoint"):
        t.resume()
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(TrainingError, match="not a napari-sam2 training checkpoint"):
        t.resume()
    (tmp_path / "checkpoint.pt").write_text("hello")
    with pytest.raises(TrainingError, match="not a readable"):
        t.resume()


@pytest.fixture(scope="module")
def train_nano():
    """scripts/train_nano.py, imported once: it registers the recipes the nano model was trained with."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_nano.py"
    spec = importlib.util.spec_from_file_location("train_nano", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recipes():
    """The recipe registry as it was, back after the test (tests register their own)."""
    saved = dict(RECIPES)
    yield RECIPES
    RECIPES.clear()
    RECIPES.update(saved)


def test_a_recipe_reinitialises_only_the_named_parts(tmp_path, recipes):
    """init from a file, then a recipe's after_load hook re-initialises the memory path
    exactly as a fresh seeded model's."""
    from napari_sam2.model import build_model

    torch.manual_seed(123)
    trained = build_model(NANO.with_image_size(SIZE))
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    register_recipe("test: fresh memory", Recipe(
        after_load=lambda model, seed: reinitialise(model, ("memory_attention", "memory_encoder"), seed)))
    cfg = TrainConfig(model=NANO.name, image_size=SIZE, init=str(tmp_path / "w.pt"), seed=7,
                      recipes=("test: fresh memory",))
    model = make_model(cfg)
    torch.manual_seed(7)
    fresh = build_model(NANO.with_image_size(SIZE)).state_dict()
    got, old = model.state_dict(), trained.state_dict()
    replaced = [k for k in got if k.startswith(("memory_attention", "memory_encoder"))]
    assert len(replaced) > 20
    for k in got:
        expected = fresh[k] if k in replaced else old[k]
        assert torch.equal(got[k], expected), k
    assert not torch.equal(fresh["sam_mask_decoder.iou_token.weight"], old["sam_mask_decoder.iou_token.weight"])
    register_recipe("test: typo", Recipe(after_load=lambda model, seed: reinitialise(model, ("memory_atention",), seed)))
    with pytest.raises(TrainingError, match="no parameter name starts with"):
        make_model(cfg.replace(recipes=("test: typo",)))
    with pytest.raises(TrainingError, match="unknown training recipe 'test: fresh memroy'.*test: fresh memory"):
        make_model(cfg.replace(recipes=("test: fresh memroy",)))


def test_nano_stage5_recipe_rescales_freezes_and_localises(tmp_path, train_nano):
    """The start-of-run changes of the nano recipe's stage 5 (registered by
    scripts/train_nano.py), each checked from outside: the embedding norm measured afresh,
    weights compared before and after a step, the memory compared across two images, the
    attention's argmax against the query's place."""
    from napari_sam2.model.common import apply_rope
    from napari_sam2.model.tracking import encode_memory

    assert "nano: local memory start" in train_nano.STAGE_5.recipes
    cfg, tr, va = _small_run(tmp_path, init="scratch", recipes=("nano: local memory start",))
    trainer = Trainer(cfg, tr, va, tmp_path / "run")
    model = trainer.model
    frames = torch.stack([s.frames[len(s) // 2] for s in tr]).float().expand(-1, 3, -1, -1)
    with torch.no_grad():
        emb = model.frame_features(model.normalize(frames)).image_embed
    assert emb.norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-4)

    # the memory is the same whatever the image under the mask
    with torch.no_grad():
        feats = model.frame_features(model.normalize(torch.rand(2, 3, SIZE, SIZE)))
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., 30:60, 40:70] = 5.0
        one = [FrameFeatures(feats.image_embed[i:i + 1], [h[i:i + 1] for h in feats.high_res], feats.pos[i:i + 1])
               for i in range(2)]
        m0, m1 = (encode_memory(model, f, mask, torch.ones(1, 1), from_clicks=True) for f in one)
    torch.testing.assert_close(m0, m1)
    assert not torch.equal(m0, encode_memory(model, one[0], -mask, torch.ones(1, 1), from_clicks=True))

    # with zero weights the cross-attention of each place peaks on the memory token of that place
    att = model.memory_attention.layers[0].cross_attn_image
    q = att.q_proj.bias.detach().expand(64, -1)[None, None]  # 1 head, 8 x 8 queries
    k = att.k_proj.bias.detach().expand(64, -1)[None, None]
    cos, sin = att.rope(64, q.device)
    logits = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)
    assert torch.equal(logits[0, 0].argmax(-1), torch.arange(64))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step()
    after = dict(model.named_parameters())
    for n, p in after.items():
        unchanged = torch.equal(before[n], p.detach())
        if n.startswith(("image_encoder", "memory_encoder.pix_feat_proj")):
            assert unchanged, n
    assert not torch.equal(before["memory_attention.layers.0.cross_attn_image.q_proj.bias"],
                           after["memory_attention.layers.0.cross_attn_image.q_proj.bias"].detach())
    assert torch.count_nonzero(after["memory_encoder.pix_feat_proj.weight"]) == 0


def test_recipe_lr_scales_multiply_the_first_step_of_the_named_parameters(tmp_path, train_nano, recipes):
    """Adam's first step moves each weight by about lr whatever its gradient, so with the
    same batch a parameter learning at 10 x the rate moves 10 x as far; the others alike.
    The nano recipe 'appearance memory' is such a scale."""
    assert train_nano.STAGE_9.recipes == ("nano: appearance memory",)
    cfg, tr, va = _small_run(tmp_path, init="scratch")
    moves = []
    for recipes in ((), ("nano: appearance memory",)):
        trainer = Trainer(cfg.replace(recipes=recipes), tr, va, tmp_path / f"run{len(recipes)}")
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train_step()
        moves.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters()})
    plain, scaled = moves
    for n in plain:
        if n.startswith("memory_encoder.pix_feat_proj"):
            assert plain[n].abs().max() > 0
            torch.testing.assert_close(scaled[n], 10 * plain[n], rtol=1e-4, atol=1e-9)
        else:
            torch.testing.assert_close(scaled[n], plain[n], rtol=0, atol=0)
    register_recipe("test: typo scale", Recipe(lr_scales=(("memory_encodr", 2.0),)))
    with pytest.raises(TrainingError, match="lr_scales: no parameter"):
        Trainer(cfg.replace(recipes=("test: typo scale",)), tr, va, tmp_path / "bad")
    register_recipe("test: typo freeze", Recipe(before_training=lambda model, stacks: freeze(model, ("image_encodr",))))
    with pytest.raises(TrainingError, match="freeze: no parameter"):
        Trainer(cfg.replace(recipes=("test: typo freeze",)), tr, va, tmp_path / "bad")


def test_training_learns_on_a_fixed_seed(tmp_path):
    """A few dozen steps: the training loss falls and validation Dice on held-out
    stacks rises. One cell per stack, so that what the tiny model can learn in
    seconds (telling the object from the background) is what Dice measures;
    telling touching objects apart from a click takes far longer (docs/training.md)."""
    from napari_sam2.sample_data import cells_2d_time

    cfg, _, _ = _small_run(tmp_path, epochs=1, steps_per_epoch=30, warmup_steps=5, lr=1e-3, val_clips=4, objects_per_clip=1)
    stacks = [
        prepare_stack(*cells_2d_time((8, SIZE, SIZE), 1, seed, radius=(14, 24)), SIZE, name=str(seed))
        for seed in range(20, 26)
    ]
    tr, va = stacks[:4], stacks[4:]
    trainer = Trainer(cfg, tr, va, tmp_path)
    losses = [ev.loss for ev in trainer.run() if ev.kind == "step"]
    before, after = trainer.history[0], trainer.history[-1]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert after["val_loss"] < before["val_loss"]
    assert after["val_dice"] > before["val_dice"] + 0.2


def test_command_line_train_then_evaluate(tmp_path, capsys):
    import json

    import tifffile

    from napari_sam2.cli import main
    from napari_sam2.sample_data import cells_2d_time

    pairs = []
    for seed in (1, 2):
        image, labels = cells_2d_time((6, 64, 64), 2, seed, radius=(8, 12))
        img, lab = tmp_path / f"img{seed}.tif", tmp_path / f"lab{seed}.tif"
        tifffile.imwrite(img, image)
        tifffile.imwrite(lab, labels)
        pairs += ["--pair", str(img), str(lab)]
    out = tmp_path / "run"
    args = ["train", *pairs, "--out", str(out), "--model", NANO.name, "--init", "scratch", "--epochs", "1",
            "--steps-per-epoch", "2", "--clip-length", "3", "--device", "cpu"]
    assert main(args) == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 2] and "val_dice" in history[-1]
    assert "epoch   1  step 2/2" in capsys.readouterr().out
    assert main(["evaluate", *pairs[:3], "--model", NANO.name, "--checkpoint", str(out / "weights.pt"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "img1.tif: 2 objects, mean 3D Dice" in printed and "distance from click" in printed
    assert "all: 2 objects, 8 orientation(s)" in printed  # the nano model's default
    assert main(["evaluate", *pairs[:3], "--checkpoint", str(out / "weights.pt"), "--orientations", "1"]) == 0
    assert "all: 2 objects, 1 orientation(s)" in capsys.readouterr().out
    # no data, and a resume with nothing to resume: plain errors, no traceback
    assert main(["train", "--out", str(tmp_path / "x")]) == 1
    assert "no data" in capsys.readouterr().err
    assert main([*args[:-4], "--resume", "--out", str(tmp_path / "empty")]) == 1
    assert "no checkpoint to resume" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_matches_cpu_validation(tmp_path):
    """Train a few steps on the GPU; the same weights validate alike on the CPU."""
    cfg, tr, va = _small_run(tmp_path, device="cuda")
    gpu = Trainer(cfg, tr, va, tmp_path / "gpu")
    losses = [ev.loss for ev in gpu.run() if ev.kind == "step"]
    assert all(np.isfinite(losses))
    cpu = Trainer(cfg.replace(device="cpu"), tr, va, tmp_path / "cpu")
    cpu.model.load_state_dict({k: v.cpu() for k, v in gpu.model.state_dict().items()})
    a, b = gpu.validate(), cpu.validate()
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-2)
    assert a["val_dice"] == pytest.approx(b["val_dice"], abs=0.02)


def test_training_forward_equals_a_session():
    """The differentiable training pass (evaluation mode, one central click on the middle
    slice, tracked both ways) gives the masks an inference session gives on the same clip."""
    from _stacks import present_tiny_model

    from napari_sam2.model.evaluate import central_pixel
    from napari_sam2.model.frames import FrameSource
    from napari_sam2.model.video import StackSession
    from napari_sam2.training import run_clip

    model = present_tiny_model(SIZE, config=NANO.name)
    cfg = TrainConfig(model=NANO.name, image_size=SIZE, clip_length=6, clips_per_step=1, objects_per_clip=1)
    stacks = [prepare_stack(*random_stack(s, kind="nuclei", size=160), SIZE) for s in (11, 12)]
    batch = sample_batch(stacks, cfg, np.random.default_rng(3), augment=False, prompt_frame=3, prompt_kind="click")
    with torch.no_grad():
        trained_path = run_clip(model, batch, cfg, torch.Generator().manual_seed(0), central=True).masks[0]
    frames = FrameSource(batch.images[0].permute(0, 2, 3, 1).numpy(), (0.0, 1.0))
    session = StackSession(model, frames, fill_hole_area=0)  # training has no hole filling
    session.add_points(3, 1, points=[central_pixel(batch.targets[0, 3].numpy())], labels=[1])
    seen = 0
    for t, masks in session.propagate("both", start=3):
        np.testing.assert_array_equal(trained_path[t].numpy(), masks[1], err_msg=f"slice {t}")
        seen += 1
    assert seen == 6 and trained_path.any(axis=(1, 2)).sum() >= 3


def test_absent_mask_weight_adds_an_empty_mask_loss_where_the_object_is_absent():
    """Worked by hand: with absent_mask_weight 0 (SAM 2's recipe) an absent object's loss is
    its object-score BCE alone; with w > 0 it adds w x the mean over its masks of
    20 x focal + dice against an empty mask. The present object's loss is unchanged."""
    import math

    from napari_sam2.model.sam2 import HeadsOutput
    from napari_sam2.training import TrainConfig, heads_loss

    s = 4
    masks = torch.full((2, 2, s, s), -3.0)
    masks[1, 0, :2, :2] = 2.0  # object 1 (absent) predicts 4 pixels in mask 0
    gt = torch.zeros(2, s, s, dtype=torch.bool)
    gt[0, 1:3, 1:3] = True  # object 0 is present
    heads = HeadsOutput(masks[:, :, ::4, ::4], masks, torch.full((2, 2), 0.5), masks[:, :1], masks[:, :1],
                        torch.zeros(2, 8), torch.tensor([[1.0], [1.0]]))

    def focal_empty(x):  # mean over pixels, target 0: alpha 0.75, gamma 2
        p = 1 / (1 + math.exp(-x))
        return 0.75 * p**2 * -math.log(1 - p)

    def expected_absent_terms():
        m0 = (4 * focal_empty(2.0) + 12 * focal_empty(-3.0)) / 16
        p0 = 4 / (1 + math.exp(-2.0)) + 12 / (1 + math.exp(3.0))
        d0 = 1 - 1 / (p0 + 1)
        m1 = focal_empty(-3.0)
        p1 = 16 / (1 + math.exp(3.0))
        d1 = 1 - 1 / (p1 + 1)
        return ((20 * m0 + d0) + (20 * m1 + d1)) / 2

    plain, _ = heads_loss(heads, gt, TrainConfig())
    weighted, _ = heads_loss(heads, gt, TrainConfig(absent_mask_weight=2.0))
    # the loss is the mean over the 2 objects, so the absent object's extra term counts half
    assert float(weighted - plain) == pytest.approx(2.0 * expected_absent_terms() / 2, rel=1e-4)
    assert float(weighted - plain) > 0.5
