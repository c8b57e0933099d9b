"""An embedding store: the image features of every slice of a stack, computed once, on disk.

``napari-sam2 embed STACK`` (or :func:`build_store`) runs the image encoder on every slice
and writes ``STACK.sam2.zarr``: one zarr array per feature level, chunked per slice,
float32 (exactly what the encoder returns, so a session reading them computes what it
would have computed; bfloat16 would halve the size but change masks slightly). The
model's identity (name, input size, a SHA-256 of its weights) and the intensity mapping
(low, high, and the stack's shape and dtype) are recorded; :func:`open_store` refuses a
store made with anything else, naming what differs. A session given
``compute_features=store.features`` reads slices from it instead of running the encoder.
The store is written under a temporary name and renamed when complete; with a dask
client the slices are spread over its workers, each writing its own chunks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import weakref
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .model.preprocess import InputError

__all__ = ["FeatureStore", "build_store", "model_identity", "open_store", "store_path"]

STORE_FORMAT = "napari-sam2 embedding store"
STORE_VERSION = 1


def store_path(stack_path: Union[str, Path]) -> Path:
    """``stack.tif`` -> ``stack.sam2.zarr`` beside it."""
    from .io import stem_of

    p = Path(stack_path)
    return p.with_name(stem_of(p) + ".sam2.zarr")


_IDENTITIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_identity(model) -> dict:
    """What makes features comparable: the model's name, input size and weights (hashed once
    per model object; weights changed in place afterwards are not seen)."""
    known = _IDENTITIES.get(model)
    if known is not None:
        return dict(known)
    identity = _hash_identity(model)
    _IDENTITIES[model] = identity
    return dict(identity)


def _hash_identity(model) -> dict:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    cfg = getattr(model, "config", None)
    return {"name": getattr(cfg, "name", None), "image_size": int(model.image_size), "weights_sha256": h.hexdigest()}


def _mapping(frames) -> dict:
    """The intensity mapping and what the stack is: shape (channels included), dtype, and a
    hash of its first, middle and last slices (another stack of the same shape differs)."""
    n = len(frames)
    h = hashlib.sha256()
    for f in sorted({0, n // 2, n - 1}):
        h.update(np.ascontiguousarray(frames.read(f)).tobytes())
    shape = [n, *np.shape(frames.frames)[1:]]
    return {"intensity_range": [float(v) for v in frames.intensity_range], "shape": shape,
            "dtype": str(np.dtype(frames.dtype)), "slices_sha256": h.hexdigest()}


def _encoder(model, frames) -> Callable:
    """``frame -> FrameFeatures`` through the image encoder, as a session computes them."""
    from .model.video import StackSession

    return StackSession(model, frames, feature_cache_mb=0).encode_frame


def _put(group, frame: int, feats) -> None:
    """One slice's features into its chunks, then its ``done`` flag."""
    group["image_embed"][frame] = feats.image_embed[0].cpu().numpy()
    for k, h in enumerate(feats.high_res):
        group[f"high_res_{k}"][frame] = h[0].cpu().numpy()
    group["done"][frame] = True


def _write_slices(path: str, model, frames, slices: Sequence[int]) -> int:
    """A worker's share: encode ``slices`` and write them into the store at ``path``."""
    import zarr

    group = zarr.open_group(path, mode="r+")
    encode = _encoder(model, frames)
    for f in slices:
        _put(group, int(f), encode(int(f)))
    return len(slices)


def build_store(out: Union[str, Path], model, frames, *, client=None, load: Optional[Callable] = None,
                stack_path: Optional[str] = None, progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Compute every slice's features of ``frames`` (a FrameSource or (N, H, W[, C]) array)
    and write them to ``out`` (a ``.sam2.zarr`` folder), replacing nothing until complete.

    With a dask ``client`` the slices are tasks: ``stack_path`` (the file the workers read)
    and ``load()`` (a picklable function giving the model on a worker) are then needed.
    progress(done, total) after each slice (here) or each task (on a cluster).
    """

    from .model.frames import FrameSource

    frames = FrameSource.for_model(model, frames)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it to build the store again")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        return _build(out, tmp, model, frames, client, load, stack_path, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted build leaves nothing behind
        raise


def _build(out: Path, tmp: Path, model, frames, client, load, stack_path, progress) -> Path:
    import zarr

    encode = _encoder(model, frames)
    probe = encode(0)  # its shapes make the arrays; here it is also slice 0's result
    n = len(frames)
    group = zarr.open_group(str(tmp), mode="w")
    levels = [("image_embed", probe.image_embed)] + [(f"high_res_{k}", h) for k, h in enumerate(probe.high_res)]
    for name, t in levels:
        shape = tuple(t.shape[1:])
        _create(group, name, (n, *shape), (1, *shape), "float32")
    _create(group, "pos", tuple(probe.pos.shape[1:]), tuple(probe.pos.shape[1:]), "float32")
    group["pos"][...] = probe.pos[0].cpu().numpy()
    _create(group, "done", (n,), (1,), "bool")  # one chunk per slice: workers never rewrite each other's
    group.attrs.update({"format": STORE_FORMAT, "version": STORE_VERSION, "model": model_identity(model),
                        **_mapping(frames), "levels": [name for name, _ in levels]})
    if client is None:
        for f in range(n):
            _put(group, f, probe if f == 0 else encode(f))
            if progress is not None:
                progress(f + 1, n)
    else:
        if stack_path is None or load is None:
            raise InputError("building a store on a cluster needs stack_path (read by the workers) and load()")
        from distributed import as_completed

        rng = frames.intensity_range
        parts = [list(range(a, min(a + 8, n))) for a in range(0, n, 8)]
        futures = client.map(_remote_slices, parts, path=str(tmp), stack_path=str(stack_path), load=load,
                             intensity_range=rng, pure=False, retries=2)
        done = 0
        for fut in as_completed(futures):
            done += fut.result()
            if progress is not None:
                progress(done, n)
    if not bool(np.all(zarr.open_group(str(tmp), mode="r")["done"][:])):
        raise RuntimeError(f"some slices of {out} were not computed")
    os.replace(tmp, out)
    return out


def _create(group, name, shape, chunks, dtype):
    if hasattr(group, "create_array"):  # zarr 3
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype)
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype)  # zarr 2


def _remote_slices(slices, *, path, stack_path, load, intensity_range) -> int:
    import zarr

    from .io import TiffStack, read_image
    from .model.frames import FrameSource

    shape = list(zarr.open_group(path, mode="r").attrs["shape"])
    source = TiffStack(stack_path) if str(stack_path).lower().endswith((".tif", ".tiff")) else None
    try:
        if source is None or list(source.shape) != shape:
            data = read_image(stack_path)  # not one page per slice (e.g. a single-IFD ImageJ stack)
        else:
            data = source  # slice by slice
        if list(np.shape(data))[: len(shape)] != shape:
            raise RuntimeError(f"a worker read {stack_path} as shape {list(np.shape(data))}, the store expects {shape}")
        return _write_slices(path, load(), FrameSource(data, intensity_range), slices)
    finally:
        if source is not None:
            source.close()


class FeatureStore:
    """Features read from a store (see :func:`open_store`)."""

    def __init__(self, path: Path, group, device) -> None:
        self.path, self._group, self.device = path, group, device
        self._levels = [group[name] for name in group.attrs["levels"]]
        self._pos = torch.from_numpy(np.asarray(group["pos"][...]))[None].to(device)

    def __len__(self) -> int:
        return int(self._group.attrs["shape"][0])

    def features(self, frame: int):
        """The slice's FrameFeatures, as the encoder gave them (float32)."""
        from .model.sam2 import FrameFeatures

        arrays = [torch.from_numpy(np.asarray(a[int(frame)]))[None].to(self.device) for a in self._levels]
        return FrameFeatures(arrays[0], arrays[1:], self._pos)


def open_store(path: Union[str, Path], model, frames) -> FeatureStore:
    """Open a store for ``model`` and ``frames``; refused (InputError) when it was made with
    another model, input size or intensity mapping, or for a stack of another shape."""
    import zarr

    from .model.frames import FrameSource

    path = Path(path)
    if not path.exists():
        raise InputError(f"no embedding store {path}")
    frames = FrameSource.for_model(model, frames)
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as err:  # not a zarr folder
        raise InputError(f"{path} is not an embedding store ({type(err).__name__}: {err})") from None
    if attrs.get("format") != STORE_FORMAT:
        raise InputError(f"{path} is not a napari-sam2 embedding store")
    want_model, have_model = model_identity(model), attrs.get("model", {})
    for key, what in (("name", "model"), ("image_size", "input size"), ("weights_sha256", "weights")):
        if want_model[key] != have_model.get(key):
            raise InputError(f"the store {path} was made with another {what} ({have_model.get(key)}, this session "
                             f"uses {want_model[key]}); build it again with this model (napari-sam2 embed)")
    mapping = _mapping(frames)
    if list(attrs.get("shape", [])) != mapping["shape"] or attrs.get("dtype") != mapping["dtype"]:
        raise InputError(f"the store {path} belongs to a stack of shape {attrs.get('shape')} {attrs.get('dtype')}; "
                         f"this one is {mapping['shape']} {mapping['dtype']}")
    if attrs.get("slices_sha256") != mapping["slices_sha256"]:
        raise InputError(f"the store {path} was made from another stack (its slices differ from this one's); build "
                         "it again for this stack")
    if not np.allclose(attrs.get("intensity_range", [np.nan] * 2), mapping["intensity_range"], rtol=0, atol=1e-9):
        raise InputError(f"the store {path} was made with intensities {attrs.get('intensity_range')} mapped to "
                         f"black..white, this session maps {mapping['intensity_range']}: use the same range, or build "
                         "the store again")
    return FeatureStore(path, group, model.device)
