"""Many stacks, one model, unattended: the engine of ``napari-sam2 batch``.

Each input stack becomes a label TIFF and a provenance JSON beside it, from one kind of
prompt: ``auto`` (segment everything, :mod:`napari_sam2.model.auto_stack`), ``points``
(a CSV of clicks: slice, y, x, object, positive), ``seeds`` (a label image whose objects
are mask prompts) or ``session`` (a saved ``.sam2.json`` whose objects and propagations
are replayed). Outputs are written to a temporary name and renamed, the JSON last: a
stack whose JSON exists is finished and is skipped by the next run, and a crash never
leaves a half-written file. One failing stack is reported and does not stop the others.
A stack with an embedding store beside it (``stack.sam2.zarr``, :mod:`napari_sam2.store`)
is tracked from the stored features (clicks and seeds); a store made with another model
or intensity mapping fails that stack with the reason.

Scale-out is dask.distributed's: :func:`run_batch` with ``workers=N`` starts a
LocalCluster of N single-threaded processes, ``scheduler=ADDRESS`` joins a running
cluster, ``client=`` takes a notebook's own client. Each worker loads the model once
(:class:`ModelPlugin`), stacks are tasks, and the worker that computed a stack writes it.
A worker that dies mid-stack leaves no finished-looking file (at most a hidden
``.NAME.*.part`` temporary, which the next attempt removes), and dask runs its task elsewhere.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import glob as globmod
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .model.preprocess import InputError

__all__ = ["PROMPT_KINDS", "BatchItem", "BatchResult", "BatchSettings", "ModelPlugin", "plan_batch",
           "process", "read_points_csv", "register_model_plugin", "result_paths", "run_batch"]

PROMPT_KINDS = ("auto", "points", "seeds", "session")
PROVENANCE_FORMAT = "napari-sam2 batch result"


@dataclass(frozen=True)
class BatchSettings:
    """What every stack of a batch is segmented with.

    model / checkpoint: as :func:`~napari_sam2.model.load_model` takes them (None: the
    bundled nano model); intensity_range: (low, high) for every stack (None: each stack's
    own percentiles); stop_after: stop an object after this many slices where it is absent
    (None: never); auto: parameters of the automatic mode (see ``segment_stack``);
    threads: torch threads per worker process (0: torch's default); roi: where clicks and
    seeds are tracked: None (whole slices), "auto" (each object on a square of the model's
    input size around its prompts: small objects in large frames keep their detail) or a
    region "ROW0:ROW1,COL0:COL1" of every slice.
    """

    model: Optional[str] = None
    checkpoint: Optional[str] = None
    device: str = "cpu"
    fast: bool = False
    intensity_range: Optional[Tuple[float, float]] = None
    stop_after: Optional[int] = 3
    auto: Dict[str, object] = field(default_factory=dict)
    threads: int = 0
    roi: Optional[str] = None

    def key(self) -> tuple:
        return (self.model, self.checkpoint, self.device)


@dataclass(frozen=True)
class BatchItem:
    """One stack: its image, the label TIFF to write, and its prompts (``kind`` one of
    :data:`PROMPT_KINDS`; ``source`` the prompt file, None for ``auto``)."""

    image: str
    output: str
    kind: str
    source: Optional[str] = None


@dataclass
class BatchResult:
    """What became of one stack: ``status`` "done", "skipped" (finished before) or "failed"
    (``error`` says why)."""

    image: str
    output: str
    status: str
    error: Optional[str] = None
    objects: int = 0
    seconds: float = 0.0
    worker: Optional[str] = None


def result_paths(output) -> Tuple[Path, Path]:
    """(labels, provenance JSON) of an output: ``x_labels.tif`` (or ``x_labels.ome.zarr``) ->
    ``x_labels.sam2-batch.json``."""
    from .io import tiff_path

    if str(output).endswith(".ome.zarr"):
        data = Path(output)
        return data, data.with_name(data.name[: -len(".ome.zarr")] + ".sam2-batch.json")
    tif = tiff_path(output)
    stem = tif.name[: -len(tif.suffix)]
    return tif, tif.with_name(stem + ".sam2-batch.json")


def plan_batch(images: Sequence, out_dir, kind: str, *, source: Optional[str] = None,
               fmt: str = "tif") -> List[BatchItem]:
    """Items for ``images`` (paths or glob patterns) writing ``OUT_DIR/<stem>_labels.tif``
    (``fmt="ome-zarr"``: ``<stem>_labels.ome.zarr``, for stacks too large for one TIFF).

    source: where each stack's prompts are, a pattern with ``{stem}`` (the image's name
    without extension) and ``{dir}`` (its folder), e.g. ``{dir}/{stem}.csv`` (the default
    for points), ``{dir}/{stem}_seeds.tif`` (seeds), or one file for all (a session).
    """
    from .io import stem_of

    if fmt not in ("tif", "ome-zarr"):
        raise InputError(f"the output format must be tif or ome-zarr, got {fmt!r}")
    if kind not in PROMPT_KINDS:
        raise InputError(f"prompts must be one of {', '.join(PROMPT_KINDS)}, got {kind!r}")
    paths: List[Path] = []
    for pattern in images:
        text = str(pattern)
        hits = sorted(globmod.glob(text)) if any(c in text for c in "*?[") else [text]
        if not hits:
            raise InputError(f"no file matches {text!r}")
        paths += [Path(os.path.abspath(h)) for h in hits]  # absolute (links kept): workers elsewhere use them
    if not paths:
        raise InputError("no input stacks given")
    defaults = {"points": "{dir}/{stem}.csv", "seeds": "{dir}/{stem}_seeds.tif"}
    if kind == "session" and not source:
        raise InputError("session prompts need the session file (--session FILE)")
    pattern = source or defaults.get(kind)
    out = Path(os.path.abspath(out_dir))

    def source_of(p: Path) -> Optional[str]:
        if pattern is None:
            return None
        try:
            return os.path.abspath(pattern.format(stem=stem_of(p), dir=str(p.parent)))
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(f"the prompts pattern {pattern!r} may hold only {{stem}} and {{dir}} ({err})") from None

    # a glob may also match prompt files (seeds) or outputs of this batch: those are not stacks
    sources = {source_of(p) for p in paths}
    made_here = (".sam2.zarr", ".sam2.json", ".sam2-batch.json", ".ome.zarr")  # stores, sessions, outputs
    paths = [p for p in dict.fromkeys(paths) if str(p) not in sources and not p.name.endswith(made_here)
             and not (p.parent == out and p.name.endswith("_labels.tif"))]
    items, seen = [], set()
    for p in paths:
        target = out / (f"{stem_of(p)}_labels.tif" if fmt == "tif" else f"{stem_of(p)}_labels.ome.zarr")
        if target in seen:
            raise InputError(f"two inputs would write {target}: give stacks distinct names")
        seen.add(target)
        items.append(BatchItem(str(p), str(target), kind, source_of(p)))
    if not items:
        raise InputError("no input stacks left (the files given are prompt files or outputs of this batch)")
    return items


def read_points_csv(path, num_slices: int, hw: Tuple[int, int]) -> Dict[Tuple[int, int], Tuple[list, list]]:
    """A clicks CSV with a header naming ``slice, y, x, object, positive`` (any order; more
    columns are ignored) -> {(slice, object): ([(x, y), ...], [1 or 0, ...])}."""
    need = ("slice", "y", "x", "object", "positive")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = [(reader.line_num, [v.strip() for v in r]) for r in reader if any(v.strip() for v in r)]
    except FileNotFoundError:
        raise InputError(f"no points file {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read the points file {path}: {err}") from None
    if any(c not in header for c in need):
        raise InputError(f"the points file {path} needs a header with the columns {', '.join(need)} "
                         f"(slices count from 0); it has {', '.join(header) or 'none'}")
    if not rows:
        raise InputError(f"the points file {path} holds no click")
    truth = {"1": True, "true": True, "yes": True, "y": True, "t": True,
             "0": False, "false": False, "no": False, "n": False, "f": False}
    out: Dict[Tuple[int, int], Tuple[list, list]] = {}
    for n, cells in rows:
        if len(cells) < len(header):
            raise InputError(f"{path}, line {n}: expected {len(header)} values ({', '.join(header)}), got {len(cells)}")
        row = dict(zip(header, cells))
        try:
            z, y, x, obj = int(row["slice"]), float(row["y"]), float(row["x"]), int(row["object"])
        except (TypeError, ValueError):
            raise InputError(f"{path}, line {n}: slice and object must be integers, y and x numbers") from None
        pos = truth.get(str(row["positive"]).lower())
        if pos is None:
            raise InputError(f"{path}, line {n}: positive must be 1 / 0 (or true / false), got {row['positive']!r}")
        if not 0 <= z < num_slices or obj < 1:
            raise InputError(f"{path}, line {n}: slice {z} is outside the stack (0..{num_slices - 1}) "
                             "or the object is not a label >= 1")
        if not (-0.5 <= y <= hw[0] - 0.5 and -0.5 <= x <= hw[1] - 0.5):
            raise InputError(f"{path}, line {n}: the point (y={y}, x={x}) is outside the slices ({hw[0]} x {hw[1]})")
        pts, labs = out.setdefault((z, obj), ([], []))
        pts.append((x, y))
        labs.append(1 if pos else 0)
    return out


# ---------------------------------------------------------------------- one stack


_MODELS: Dict[tuple, object] = {}


def get_model(settings: BatchSettings):
    """The settings' model, loaded once per process (a worker keeps it between stacks)."""
    key = settings.key()
    if settings.threads:
        import torch

        # per calling thread: OpenMP keeps the setting per thread, and a dask worker runs
        # tasks on another thread than its plugins (and sets OMP_NUM_THREADS=1 for them)
        torch.set_num_threads(int(settings.threads))
    if key not in _MODELS:
        from .model import load_model
        from .model.config import DEFAULT_MODEL

        name = settings.model or (None if settings.checkpoint else DEFAULT_MODEL)
        _MODELS[key] = load_model(name, settings.checkpoint, device=settings.device)
    return _MODELS[key]


def _segment(item: BatchItem, settings: BatchSettings, model, image: np.ndarray,
             on_slice: Optional[Callable[[int], None]]) -> Tuple[np.ndarray, dict]:
    """The label volume of one stack and what produced it."""
    from .model.auto_stack import is_single_image, segment_slice, segment_stack
    from .segmenter import write_masks

    rng = settings.intensity_range
    two_d = is_single_image(image.shape)
    if item.kind == "auto":
        if two_d:
            return segment_slice(model, image, rng, fast=settings.fast, **settings.auto), {}
        params = {"stop_after_absent": settings.stop_after or None, **settings.auto}
        labels = segment_stack(model, image, rng, fast=settings.fast,
                               progress=None if on_slice is None else (lambda e: on_slice(e.frame)), **params)
        return labels, {"auto": {k: v for k, v in params.items()}}
    if item.kind == "session":
        return _replay_session(item, settings, model, image)
    if two_d or not (image.ndim == 3 or (image.ndim == 4 and image.shape[-1] in (3, 4))):
        raise InputError(f"{item.image}: clicks and seeds need a stack (N, H, W) or (N, H, W, RGB), got shape "
                         f"{image.shape}")
    from .model.frames import FrameSource

    frames = FrameSource.for_model(model, image, rng)
    if item.kind == "points":
        clicks = sorted(read_points_csv(item.source, image.shape[0], image.shape[1:3]).items())
        prompts = [(obj, z, {"points": pts, "labels": labs}) for (z, obj), (pts, labs) in clicks]
    else:  # seeds
        from .io import read_image

        if not Path(item.source).exists():
            raise InputError(f"no seeds file {item.source}")
        seeds = np.asarray(read_image(item.source))
        from .model.video import largest_slices

        if seeds.shape == image.shape[1:3]:  # a 2D label image seeds the middle slice
            mid = image.shape[0] // 2
            prompts = [(obj, mid, {"seeds": seeds}) for obj in largest_slices(seeds[None], (1, *seeds.shape))]
        else:  # each object on the slice where its seed is largest (its mask is made when given)
            prompts = [(obj, z, {"seeds": seeds[z]}) for obj, z in largest_slices(seeds, image.shape[:3]).items()]
    labels = np.zeros(image.shape[:3], np.uint32)
    for session in _sessions(model, frames, prompts, settings, item):
        for z, masks in session.propagate("both", stop_after_absent=settings.stop_after or None):
            write_masks(labels, (z,), masks)
            if on_slice is not None:
                on_slice(z)
    return labels, {} if settings.roi is None else {"roi": settings.roi}


def _sessions(model, frames, prompts, settings: BatchSettings, item: BatchItem):
    """Sessions holding the prompts: one on whole slices (with the stack's embedding store when
    one matches), or one per object on its region (``settings.roi``)."""
    from .model.ensemble import open_session
    from .model.roi import Roi, region_around
    from .store import open_store, store_path

    def give(session, obj, z, p):
        if "seeds" in p:
            session.add_mask(z, obj, p["seeds"] == obj)
        else:
            session.add_points(z, obj, points=p["points"], labels=p["labels"], clear=False)

    if settings.roi != "auto":  # one session: whole slices (with a matching store), or one region
        store = store_path(item.image)
        whole = settings.roi is None and store.exists()
        features = open_store(store, model, frames).features if whole else None  # a mismatch is refused
        roi = None if settings.roi is None else Roi.parse(settings.roi)
        session = open_session(model, frames, fast=settings.fast, compute_features=features, roi=roi)
        for obj, z, p in prompts:
            give(session, obj, z, p)
        yield session
        return
    by_object: Dict[int, list] = {}
    for obj, z, p in prompts:
        by_object.setdefault(obj, []).append((z, p))
    for obj, items in sorted(by_object.items()):  # each on a region around its clicks, or its seed mask
        xy = [q for _z, p in items if "points" in p for q in np.asarray(p["points"]).reshape(-1, 2)]
        mask = next((p["seeds"] == obj for _z, p in items if "seeds" in p), None)
        roi = region_around(frames.shape, model.image_size, xy=xy or None, mask=mask)
        session = open_session(model, frames, roi=roi, fast=settings.fast)
        for z, p in items:
            give(session, obj, z, p)
        yield session


def _replay_session(item: BatchItem, settings: BatchSettings, model, image) -> Tuple[np.ndarray, dict]:
    """A saved session's objects, prompts and propagations on this stack."""
    from .controller import Annotator, load_session

    record = load_session(item.source)
    view = record.get("view") or {}
    labels = np.zeros(image.shape[:-1] if record["image"].get("rgb") else image.shape, np.uint32)
    ann = Annotator(model, image, rgb=bool(record["image"].get("rgb")), axis=view.get("axis"),
                    displayed=tuple(view.get("displayed") or (image.ndim - 2, image.ndim - 1)), labels=labels,
                    intensity_range=settings.intensity_range or (record.get("settings") or {}).get("intensity_range"),
                    fast=settings.fast, stop_after=settings.stop_after)
    errors = []
    ann.on_notify = lambda level, text: errors.append(text) if level == "error" else None
    ann.resume(record, propagate=True)
    if errors:
        raise InputError(errors[0].replace("napari-sam2: ", ""))
    return np.asarray(ann.labels), {"session": str(item.source)}


def _run_record(item: BatchItem, settings: BatchSettings) -> dict:
    """What decides a stack's result besides the model's weights: the input (its size and
    modification time), the prompts (and their file's), the settings."""
    def stamp(path):
        st = Path(path).stat() if path and Path(path).exists() else None
        return None if st is None else [st.st_size, st.st_mtime_ns]

    return {"image": stamp(item.image), "prompts": [item.kind, item.source, stamp(item.source)],
            "model": [settings.model, settings.checkpoint],
            "settings": {k: v for k, v in asdict(settings).items() if k not in ("model", "checkpoint", "threads")}}


def _same_run(meta: Path, item: BatchItem, settings: BatchSettings) -> bool:
    """Whether the finished result at ``meta`` came from this very run (else it is redone)."""
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("run") == json.loads(json.dumps(_run_record(item, settings)))
    except (OSError, ValueError):
        return False


def process(item: BatchItem, settings: BatchSettings, *, model=None,
            on_slice: Optional[Callable[[int], None]] = None) -> BatchResult:
    """Segment one stack and write its label TIFF, then its provenance JSON (both atomically).
    A stack whose JSON exists is skipped; errors become a "failed" result, never an exception."""
    from . import __version__
    from .files import atomic_write_text
    from .io import read_image, write_labels, write_ome_zarr_labels
    from .store import model_identity

    tif, meta = result_paths(item.output)
    if meta.exists() and tif.exists() and _same_run(meta, item, settings):
        return BatchResult(item.image, str(tif), "skipped")
    t0 = time.perf_counter()
    try:
        model = model if model is not None else get_model(settings)
        try:
            image = np.asarray(read_image(item.image))
        except (ValueError, OSError) as err:  # FileNotFoundError included
            raise InputError(f"cannot read {item.image}: {err}") from None
        if image.ndim < 2 or image.size == 0:
            raise InputError(f"{item.image} holds no image (shape {image.shape})")
        labels, extra = _segment(item, settings, model, image, on_slice)
        top = int(labels.max()) if labels.size else 0
        labels = labels.astype(np.uint16) if top <= np.iinfo(np.uint16).max else labels
        for stale in [*tif.parent.glob(f".{globmod.escape(tif.name)}.*.part"),
                      *meta.parent.glob(f".{globmod.escape(meta.name)}.*.part")]:
            stale.unlink(missing_ok=True)  # left by a worker that died while writing
        if str(tif).endswith(".ome.zarr"):
            write_ome_zarr_labels(tif, labels, overwrite=True)
        else:
            write_labels(tif, labels, overwrite=True)
        objects = int(np.count_nonzero(np.unique(labels)))
        seconds = time.perf_counter() - t0
        record = {
            "format": PROVENANCE_FORMAT, "napari_sam2": __version__,
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "image": str(item.image), "labels": str(tif), "prompts": {"kind": item.kind, "source": item.source, **extra},
            "model": {**model_identity(model), "checkpoint": settings.checkpoint},
            "settings": {k: v for k, v in asdict(settings).items() if k not in ("model", "checkpoint")},
            "shape": list(labels.shape), "objects": objects, "seconds": round(seconds, 3),
            "run": _run_record(item, settings),
        }
        text = json.dumps(record, indent=1)
        atomic_write_text(meta, text, what="the provenance record")
        return BatchResult(item.image, str(tif), "done", objects=objects, seconds=seconds)
    except Exception as err:  # one stack's failure is reported, the batch goes on
        msg = str(err) if isinstance(err, (InputError, OSError, ValueError)) else f"{type(err).__name__}: {err}"
        return BatchResult(item.image, str(tif), "failed", error=" ".join(msg.split()),
                           seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------- many stacks


def ModelPlugin(settings: BatchSettings):  # a function: distributed is imported late
    """A dask worker plugin: each worker process loads the settings' model once, when it starts."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class _ModelPlugin(WorkerPlugin):
        name = "napari-sam2-model"

        def __init__(self, settings: BatchSettings) -> None:
            self.settings = settings

        def setup(self, worker) -> None:
            get_model(self.settings)

        # no teardown: registering the plugin again (a later batch on the same client) keeps
        # the loaded model, instead of loading it once more on every worker

    return _ModelPlugin(settings)


SLICE_TOPIC = "napari-sam2-slice"


def _task(item: BatchItem, settings: BatchSettings, report: bool = False) -> BatchResult:
    from distributed import get_worker

    worker = get_worker()
    on_slice = (lambda z: worker.log_event(SLICE_TOPIC, {"image": item.image, "slice": int(z)})) if report else None
    result = process(item, settings, model=get_model(settings), on_slice=on_slice)
    result.worker = worker.address
    return result


def run_batch(items: Sequence[BatchItem], settings: BatchSettings, *, workers: int = 0,
              scheduler: Optional[str] = None, client=None,
              on_result: Optional[Callable[[BatchResult, int, int], None]] = None,
              on_slice: Optional[Callable[[int], None]] = None,
              on_dashboard: Optional[Callable[[str], None]] = None) -> List[BatchResult]:
    """Process ``items``: here, one after another (no workers, scheduler or client), or as
    tasks on a dask.distributed cluster (``workers`` local processes, a ``scheduler``
    address, or a ``client``). on_result(result, done, total) as each stack ends; on_slice(z)
    after each slice (from the workers through dask's event log when on a cluster);
    on_dashboard(link) once a cluster is up. Returns the
    results in the order of ``items``."""
    items = list(items)
    total = len(items)
    if not (workers or scheduler or client):
        model = None
        results = []
        for k, item in enumerate(items, 1):
            if model is None and not all(p.exists() for p in result_paths(item.output)):
                model = get_model(settings)
            r = process(item, settings, model=model, on_slice=on_slice)
            results.append(r)
            if on_result is not None:
                on_result(r, k, total)
        return results
    from distributed import Client, LocalCluster, as_completed

    own_cluster = own_client = None
    try:
        if client is None:
            if scheduler:
                client = own_client = Client(scheduler)
            else:
                import logging

                own_cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                           dashboard_address=":0", silence_logs=logging.WARNING)
                client = own_client = Client(own_cluster)
        if on_dashboard is not None:
            on_dashboard(str(client.dashboard_link))
        if settings.threads == 0 and own_cluster is not None:
            settings = _with_threads(settings, 1)  # one torch thread per single-threaded worker process
        register_model_plugin(client, settings)
        # no retries: a stack's own failure is a result, not an exception; a worker that dies
        # is handled by the scheduler, which runs its task elsewhere
        if on_slice is not None:
            client.subscribe_topic(SLICE_TOPIC, lambda event: on_slice(int(event[1]["slice"])))
        futures = client.map(_task, items, settings=settings, report=on_slice is not None, pure=False)
        index = {f.key: k for k, f in enumerate(futures)}
        results: List[Optional[BatchResult]] = [None] * total
        for done, fut in enumerate(as_completed(futures), 1):
            k = index[fut.key]
            try:
                r = fut.result()
            except Exception as err:  # the task itself died (e.g. its worker, three times)
                r = BatchResult(items[k].image, str(result_paths(items[k].output)[0]), "failed",
                                error=f"{type(err).__name__}: {err}")
            results[k] = r
            if on_result is not None:
                on_result(r, done, total)
        return [r for r in results if r is not None]
    finally:
        if on_slice is not None and client is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(SLICE_TOPIC)
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()


def _with_threads(settings: BatchSettings, threads: int) -> BatchSettings:
    from dataclasses import replace

    return replace(settings, threads=threads)


def register_model_plugin(client, settings: BatchSettings) -> None:
    """Have every worker of ``client`` load the settings' model now (and keep it)."""
    plugin = ModelPlugin(settings)
    if hasattr(client, "register_plugin"):
        client.register_plugin(plugin, name=plugin.name)
    else:  # distributed < 2023.9
        client.register_worker_plugin(plugin, name=plugin.name)
