"""Official checkpoints: where they come from, how they are cached and loaded.

Downloads go through pooch, which writes to a temporary file in the cache
folder and moves it into place only after the SHA-256 sum matched, so an
interrupted or corrupt download never leaves a file that looks complete.

Official files are checked against the SHA-256 sums Meta published (pinned in
:data:`CHECKPOINTS`), on download and again before a cached file is first used.
A verified file gets a small ``<file>.verified`` record of its size, modification
time and sum, so later loads do not read gigabytes to hash it again unless the
file changed.

Loading is strict (``weights_only=True`` and ``strict=True``). A file that does
not fit the requested model gets an error that says what it looks like.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from ..files import atomic_write, atomic_write_text
from .config import DEFAULT_MODEL, SAM2Config, get_config
from .errors import CheckpointError
from .sam2 import SAM2Model, build_model

__all__ = [
    "BUNDLED",
    "CHECKPOINTS",
    "CheckpointError",
    "CheckpointInfo",
    "cache_dir",
    "describe_state_dict",
    "fetch_checkpoint",
    "load_model",
    "model_for_checkpoint",
    "read_state_dict",
]

_BASE_20 = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
_BASE_21 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"


@dataclass(frozen=True)
class CheckpointInfo:
    """An official checkpoint file and its published SHA-256 sum.

    ``sha256=None`` (only for entries a user registers without a known sum)
    falls back to trust on first use: the file is still downloaded atomically,
    and the sum of the first download is written beside it (``<file>.sha256``)
    so that later loads are checked against it.
    """

    url: str
    sha256: Optional[str] = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# SHA-256 sums as published by Meta for the files under 072824/ (SAM 2.0) and 092824/ (SAM 2.1)
_PUBLISHED_SHA256 = {
    "sam2_hiera_tiny": "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125",
    "sam2_hiera_small": "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3",
    "sam2_hiera_base_plus": "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071",
    "sam2_hiera_large": "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b",
    "sam2.1_hiera_tiny": "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
    "sam2.1_hiera_small": "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
    "sam2.1_hiera_base_plus": "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
    "sam2.1_hiera_large": "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
}

CHECKPOINTS: Dict[str, CheckpointInfo] = {
    name: CheckpointInfo(f"{_BASE_21 if name.startswith('sam2.1_') else _BASE_20}{name}.pt", sha256=digest)
    for name, digest in _PUBLISHED_SHA256.items()
}
# MedSAM2 (Bo Wang's lab): SAM 2.1 tiny fine-tuned at 512 px on 3D medical images and
# videos, stored as Meta's checkpoints are ({"model": state dict}). No sum is published:
# the first download's sum is recorded and later loads are checked against it.
CHECKPOINTS["medsam2"] = CheckpointInfo("https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt")


# Weights that ship inside the package: registry name -> (file in napari_sam2/weights, SHA-256).
# The nano model: a demo trained from scratch on generated stacks by scripts/train_nano.py
# (docs/training.md), not a substitute for SAM 2.1. export_bundled() writes the file and
# returns the sum to record here.
BUNDLED: Dict[str, Tuple[str, str]] = {
    "sam2.1_nano_synthetic": (
        "sam2.1_nano_synthetic.pt",
        "dc762571ec073a87ebe5cd4fd898286e1c16cb83b7111e2f5430ce63badb65fb",
    ),
}


def bundled_path(name: str) -> Path:
    """Where the package keeps the weights of bundled model ``name`` (``name``.pt for a
    model not yet in :data:`BUNDLED`, i.e. when exporting it the first time)."""
    file = BUNDLED[name][0] if name in BUNDLED else f"{name}.pt"
    return Path(__file__).resolve().parent.parent / "weights" / file


def export_bundled(weights: Union[str, Path], name: str = "sam2.1_nano_synthetic") -> Tuple[Path, str]:
    """Write trained weights (float16, to halve the size) as the package's file for
    ``name``; returns (path, SHA-256) — the sum then goes into :data:`BUNDLED`."""
    sd = read_state_dict(weights)
    model = build_model(get_config(name))
    load_weights(model, sd, source=str(weights))
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    target = bundled_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(half, target)
    return target, _sha256(target)


def atomic_save(obj, path: Path) -> None:
    """torch.save into a temporary file beside ``path``, then rename it into place."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), what="the weights")




def cache_dir() -> Path:
    """Per-user cache folder (``$NAPARI_SAM2_CACHE`` overrides it)."""
    env = os.environ.get("NAPARI_SAM2_CACHE")
    if env:
        return Path(env)
    import pooch

    return Path(pooch.os_cache("napari-sam2"))


def fetch_checkpoint(
    url: str,
    *,
    sha256: Optional[str] = None,
    folder: Optional[Union[str, Path]] = None,
    progressbar: Union[bool, object] = True,
    timeout: float = 30.0,
) -> Path:
    """Download ``url`` into ``folder`` (the cache by default) unless it is there.

    Returns the local path. Raises :class:`CheckpointError` with the URL and the
    place to put the file by hand when the download fails, and when the
    downloaded bytes do not match ``sha256`` (nothing is left in the cache then).
    A file already in ``folder`` is used only if its sum is ``sha256``; it is
    hashed once and then again only when its size, modification time or inode
    changed. One that does not match is refused (never silently replaced) with
    a message saying how to download it again.
    """
    import pooch

    folder = Path(folder) if folder is not None else cache_dir()
    filename = url.rsplit("/", 1)[-1]
    target = folder / filename
    if progressbar is True:
        try:
            import tqdm  # noqa: F401
        except ImportError:  # pooch needs tqdm for its bar
            progressbar = False
    known = f"sha256:{sha256}" if sha256 else None
    if target.exists():
        # checked here, not by pooch: pooch would hash the whole file on every call and
        # silently download over a file that does not match
        _check_cached(target, url, sha256)
        return target
    try:
        path = pooch.retrieve(
            url,
            known_hash=known,
            fname=filename,
            path=folder,
            downloader=pooch.HTTPDownloader(progressbar=progressbar, timeout=timeout),
        )
    except ValueError as err:  # pooch: hash mismatch; the temporary file is already gone
        raise CheckpointError(
            f"the file downloaded from {url} is corrupt or not the expected one "
            f"(its SHA-256 sum does not match {sha256}); nothing was kept. "
            f"Try again, or download it by hand and put it at {target}."
        ) from err
    except Exception as err:  # connection refused, timeout, interrupted transfer, HTTP error
        raise CheckpointError(
            f"could not download {url}: {err.__class__.__name__}: {err}. "
            f"If this computer is offline, download the file on another one and put it at "
            f"{target}, or pass its path as the checkpoint."
        ) from err
    path = Path(path)
    if known is None:
        _record_sum(path)
    else:  # pooch has just checked the sum
        _record_verified(path, sha256)
    return path


def _sha256(path: Path) -> str:
    import pooch

    return pooch.file_hash(str(path), alg="sha256")


def _record_sum(path: Path) -> None:
    side = path.with_name(path.name + ".sha256")
    if not side.exists():
        digest = _sha256(path)
        atomic_write_text(side, digest + "\n", what="the checksum")
        _record_verified(path, digest)


def _check_cached(path: Path, url: str, sha256: Optional[str]) -> None:
    """Refuse a cached file whose sum is not the expected one.

    With a published ``sha256`` that sum decides, whatever an older
    trust-on-first-use record (``<file>.sha256``) says; without one the
    recorded sum of the first download does, if there is one.
    """
    side = path.with_name(path.name + ".sha256")
    expected = sha256 or (side.read_text().strip() if side.exists() else None)
    if not expected or _verified_unchanged(path, expected):
        return
    actual = _sha256(path)
    if actual != expected:
        if not sha256:
            raise CheckpointError(
                f"{path} changed since it was downloaded (SHA-256 differs from {side}); "
                "delete both files to download it again."
            )
        name = next((n for n, info in CHECKPOINTS.items() if info.url == url), None)
        again = f"run `napari-sam2 fetch {name}`" if name else f"fetch {url} again"
        raise CheckpointError(
            f"the cached checkpoint {path} is not the published file (its SHA-256 sum is {actual}, "
            f"expected {sha256}); it may be damaged, or an unchecked download kept from an older "
            f"version of napari-sam2. Delete {path} and {again} to download it again."
        )
    _record_verified(path, expected)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _record_verified(path: Path, sha256: str) -> None:
    """Note that ``path``, as it is now (size, modification time, inode), has sum ``sha256``."""
    stamp = _stamp_path(path)
    try:
        atomic_write_text(stamp, json.dumps({**_file_stamp(path), "sha256": sha256}) + "\n", what="the checksum")
    except OSError:  # a read-only cache: the file is simply hashed again next time
        pass


def _verified_unchanged(path: Path, sha256: str) -> bool:
    """Whether ``path`` was verified to have sum ``sha256`` and has not changed since."""
    try:
        record = json.loads(_stamp_path(path).read_text())
        return isinstance(record, dict) and record == {**_file_stamp(path), "sha256": sha256}
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- reading and checking

_SIZES_BY_TRUNK: Mapping[Tuple[int, int], str] = {
    (96, 12): "tiny",
    (96, 16): "small",
    (112, 24): "base_plus",
    (144, 48): "large",
}


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file safely (``weights_only=True``) and return its state dict."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; a checkpoint is a single .pt file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds (UnpicklingError, KeyError, RuntimeError...)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). It may be truncated or not a "
            "model file at all; download it again."
        ) from err
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no model weights (expected a dict of tensors, or one under 'model')")
    return dict(obj)


_TRUNK_KEY = "image_encoder.trunk.patch_embed.proj.weight"


def _signature(sd: Mapping[str, torch.Tensor]) -> Tuple[str, int, int]:
    """(SAM version, trunk width, trunk blocks) of a SAM 2 state dict."""
    keys = set(sd)
    version = "2.1" if ("no_obj_embed_spatial" in keys or "obj_ptr_tpos_proj.weight" in keys) else "2.0"
    blocks = len({k.split(".")[3] for k in keys if k.startswith("image_encoder.trunk.blocks.")})
    return version, sd[_TRUNK_KEY].shape[0], blocks


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """A short human description of what a state dict looks like."""
    keys = set(sd)
    if _TRUNK_KEY not in keys:
        if any(k.startswith("mask_decoder.") for k in keys) and any("rel_pos" in k for k in keys):
            return "a SAM 1 (segment-anything) checkpoint"
        if any(k.startswith("sam_mask_decoder.") for k in keys):
            return "a SAM 2 checkpoint without its image encoder"
        return "not a SAM 2 checkpoint"
    version, dim, blocks = _signature(sd)
    size = _SIZES_BY_TRUNK.get((dim, blocks), f"custom (width {dim}, {blocks} blocks)")
    return f"a SAM {version} {size} checkpoint"


def model_for_state_dict(sd: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> str:
    """The registry name whose architecture fits ``sd`` (first match; models that
    differ only in input size share weights)."""
    from .config import MODELS

    if _TRUNK_KEY not in sd or "sam_mask_decoder.iou_token.weight" not in sd:
        raise CheckpointError(f"{source} looks like {describe_state_dict(sd)}; it cannot be used")
    wanted = (*_signature(sd), sd["sam_mask_decoder.iou_token.weight"].shape[1])
    for name, cfg in MODELS.items():
        if (cfg.version, cfg.trunk.embed_dim, sum(cfg.trunk.stages), cfg.d_model) == wanted:
            return name
    raise CheckpointError(
        f"{source} looks like {describe_state_dict(sd)}, which fits no registered model; "
        "register a config for it (napari_sam2.model.config.register)"
    )


def model_for_checkpoint(path: Union[str, Path]) -> str:
    """The registry name whose architecture fits the weights in ``path``."""
    return model_for_state_dict(read_state_dict(path), str(path))


def _expected_description(cfg: SAM2Config) -> str:
    size = _SIZES_BY_TRUNK.get(
        (cfg.trunk.embed_dim, sum(cfg.trunk.stages)),
        f"custom (width {cfg.trunk.embed_dim}, {sum(cfg.trunk.stages)} blocks)",
    )
    return f"a SAM {cfg.version} {size} checkpoint"


def load_weights(model: SAM2Model, sd: Mapping[str, torch.Tensor], *, source: str = "the checkpoint") -> None:
    """Strictly load ``sd`` into ``model``; explain a mismatch in one sentence."""
    want = _expected_description(model.config)
    have = describe_state_dict(sd)
    own = model.state_dict()
    mismatch = set(own) ^ set(sd) or {k for k in own if own[k].shape != sd[k].shape}
    if mismatch:
        raise CheckpointError(
            f"{source} looks like {have}, but model {model.config.name!r} needs {want}. "
            "Choose the matching model, or the matching checkpoint file."
        )
    model.load_state_dict(sd, strict=True)


def load_model(
    name: Optional[str] = DEFAULT_MODEL,
    checkpoint: Optional[Union[str, Path]] = None,
    *,
    device: Union[str, torch.device, None] = "cpu",
    image_size: Optional[int] = None,
    progressbar: Union[bool, object] = True,
) -> SAM2Model:
    """Build model ``name`` and load its weights.

    ``checkpoint`` is a local file (with ``name=None`` the model is the one whose
    architecture the file holds); without it the package's bundled weights
    are used (models in :data:`BUNDLED`, checked against their recorded sum),
    or the official file is fetched into the cache on first use.
    """
    if name is None:  # the architecture the file holds
        if checkpoint is None:
            raise CheckpointError("give a model name or a checkpoint file")
        sd = read_state_dict(checkpoint)
        return _build_and_load(model_for_state_dict(sd, str(checkpoint)), sd, str(checkpoint), device, image_size)
    get_config(name)  # an unknown name fails here, listing the known ones
    if checkpoint is None and name in BUNDLED:
        checkpoint = bundled_path(name)
        if not checkpoint.exists():
            raise CheckpointError(f"the bundled weights of {name!r} are missing from the installation ({checkpoint}); reinstall napari-sam2")
        expected = BUNDLED[name][1]
        if _sha256(checkpoint) != expected:
            raise CheckpointError(
                f"the bundled weights {checkpoint} do not match their recorded SHA-256 sum; "
                "the installation is damaged: reinstall napari-sam2"
            )
    if checkpoint is None:
        if name not in CHECKPOINTS:
            raise CheckpointError(
                f"model {name!r} has no official download (e.g. a fine-tune you registered); "
                "pass the checkpoint file you have for it"
            )
        info = CHECKPOINTS[name]
        checkpoint = fetch_checkpoint(info.url, sha256=info.sha256, progressbar=progressbar)
    return _build_and_load(name, read_state_dict(checkpoint), str(checkpoint), device, image_size)


def _build_and_load(name: str, sd, source: str, device, image_size: Optional[int]) -> SAM2Model:
    cfg = get_config(name)
    if image_size is not None:
        cfg = cfg.with_image_size(image_size)
    model = build_model(cfg)
    load_weights(model, sd, source=source)
    return model.to(device).eval()
