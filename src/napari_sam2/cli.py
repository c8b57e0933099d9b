"""Command line: ``napari-sam2 models | gui | fetch | segment | train | evaluate``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .model.config import DEFAULT_MODEL, MODELS, ORIENTATION_CHOICES

# options whose values may start with "-" (negative coordinates such as --point -5,10)
_COORDINATE_OPTIONS = ("--point", "--negative", "--box")
_NEGATIVE_VALUE = re.compile(r"-[0-9.]")


def _attach_negative_values(argv: Sequence[str]) -> List[str]:
    """``--point -5,10`` -> ``--point=-5,10``: argparse would take ``-5,10`` for an option."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # everything after it is positional
            out.extend(argv[i:])
            break
        if arg in _COORDINATE_OPTIONS and i + 1 < len(argv) and _NEGATIVE_VALUE.match(argv[i + 1]):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _parse_xy(text: str) -> List[float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y (column,row) pixels, got {text!r}") from None
    return [x, y]


def _parse_box(text: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",")]
        assert len(vals) == 4
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1 pixels, got {text!r}") from None
    return vals


def _add_orientations(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--orientations", type=int, choices=ORIENTATION_CHOICES,
                        help="track in this many rotated / mirrored views and average "
                             "(default: 8 for the bundled nano model, 1 for Meta's models)")


def _add_model_options(p: argparse.ArgumentParser, *, device: str = "auto", fast: bool = True,
                       overwrite: bool = True) -> None:
    """--model, --checkpoint, --range, --device, and --fast / --overwrite where they apply."""
    p.add_argument("--model", help=f"registry name (default: the one --checkpoint holds, else {DEFAULT_MODEL}, bundled)")
    p.add_argument("--checkpoint", type=Path, help="local checkpoint file (default: bundled, or download the official one)")
    p.add_argument("--range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="intensity range mapped to black..white (default: 0..255 for 8-bit data, else the "
                        "model profile's percentiles, 0.5 and 99.5)")
    p.add_argument("--device", default=device, help=f"auto, cpu, cuda or mps (default {device})")
    if fast:
        p.add_argument("--fast", action="store_true", help="bfloat16 mode (faster on CPUs with AVX-512 BF16 / AMX and on GPUs)")
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    """--workers / --scheduler (batch, embed)."""
    p.add_argument("--workers", type=int, default=0, help="spread the work over a dask LocalCluster of N processes")
    p.add_argument("--scheduler", help="use a running dask.distributed scheduler (e.g. tcp://host:8786)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-sam2", description="Segment Anything 2 for microscopy images and stacks")
    from . import __version__
    from .training.config import FINE_TUNE_LR, TrainConfig

    p.add_argument("--version", action="version", version=f"napari-sam2 {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the registered models and their download URLs")

    g = sub.add_parser("gui", help="open napari with the SAM 2 widget (and generated sample data)")
    g.add_argument("image", nargs="?", type=Path, help="an image or stack to open (default: generated 3D nuclei)")
    g.add_argument("--model", default=None, help="registry name, e.g. sam2.1_hiera_small")
    g.add_argument("--checkpoint", type=Path, help="local checkpoint file")
    _add_orientations(g)

    f = sub.add_parser("fetch", help="download an official checkpoint into the cache")
    f.add_argument("model", help="registry name, e.g. sam2.1_hiera_tiny")

    s = sub.add_parser("segment", help="segment one 2D image from clicks and/or a box, write a label TIFF")
    s.add_argument("image", type=Path, help="a 2D TIFF (or any file tifffile/scikit-image reads)")
    s.add_argument("-o", "--output", type=Path, required=True, help="label TIFF to write")
    s.add_argument("--point", type=_parse_xy, action="append", default=[],
                   help="positive click X,Y (column,row pixels; repeatable)")
    s.add_argument("--negative", type=_parse_xy, action="append", default=[],
                   help="negative click X,Y (column,row pixels; repeatable)")
    s.add_argument("--box", type=_parse_box, help="box X0,Y0,X1,Y1")
    _add_model_options(s)

    a = sub.add_parser(
        "auto", help="segment every object of a 2D image, a z-stack or a time-lapse automatically, write a label TIFF",
        description="Automatic instance segmentation: a grid of point prompts on a key slice (the middle one by "
        "default) proposes objects; each is tracked both ways through the stack as far as it exists, and every "
        "--every slices proposals no tracked object covers become new objects. A 2D image gets its proposals only.",
    )
    a.add_argument("image", type=Path, help="a TIFF stack (N, H, W), a NIfTI volume (.nii, .nii.gz), or a 2D image")
    a.add_argument("-o", "--output", type=Path, required=True,
                   help="labels to write: TIFF (uint16, or uint32 if needed), or NIfTI (.nii.gz) with the source's geometry")
    a.add_argument("--window", help="intensity window instead of --range: CT presets soft-tissue, lung, bone, "
                   "brain (Hounsfield units), or mr (0.5-99.5 percentiles of nonzero voxels)")
    a.add_argument("--every", type=int, default=4, help="look for new objects every N slices (default 4)")
    a.add_argument("--key-slice", type=int, help="the slice proposals start on (default: the middle)")
    a.add_argument("--covered", type=float, default=0.5,
                   help="a proposal this fraction of which is already labelled is a known object (default 0.5)")
    a.add_argument("--stop-after", type=int, default=2, metavar="N",
                   help="stop following an object after N slices where the model finds it absent (default 2; 0: never)")
    a.add_argument("--points-per-side", type=int, default=32, help="grid of point prompts per slice (default 32)")
    a.add_argument("--stability", type=float, default=0.6, help="stability score a proposal needs (default 0.6)")
    a.add_argument("--pred-iou", type=float, default=0.0, help="predicted IoU a proposal needs (default 0: any)")
    a.add_argument("--min-area", type=int, default=16, help="smallest object in pixels of a slice (default 16)")
    a.add_argument("--tile", default="auto", metavar="auto|N|none",
                   help="2D images: cut into overlapping N x N tiles seen at full detail, objects on tile borders "
                        "merged (default auto: tiles of the model's input size when the image is over 1.5 times "
                        "larger; none: the whole image at once)")
    a.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles (default a quarter of a tile, >= 32)")
    _add_model_options(a)
    a.add_argument("--quiet", action="store_true", help="no progress bar")

    b = sub.add_parser(
        "batch", help="segment many stacks unattended (here, or on a dask.distributed cluster)",
        description="Each input becomes OUT_DIR/<name>_labels.tif and a provenance JSON "
        "(<name>_labels.sam2-batch.json). Finished stacks (JSON present) are skipped, so a stopped batch "
        "resumes where it was; a failing stack is reported and the others go on; the exit status is 1 "
        "when any failed.",
    )
    b.add_argument("inputs", nargs="+", help="stacks: paths or quoted glob patterns (e.g. 'plate1/*.tif')")
    b.add_argument("-o", "--out-dir", type=Path, required=True, help="folder for the label TIFFs and JSONs")
    how = b.add_mutually_exclusive_group(required=True)
    how.add_argument("--auto", action="store_true",
                     help="segment everything (napari-sam2 auto's defaults, but --stop-after applies: 3 unless given)")
    how.add_argument("--points", nargs="?", const="{dir}/{stem}.csv", metavar="PATTERN",
                     help="clicks CSV per stack with columns slice,y,x,object,positive, slices from 0 "
                          "(default {dir}/{stem}.csv; give a pattern as --points=PATTERN)")
    how.add_argument("--seeds", nargs="?", const="{dir}/{stem}_seeds.tif", metavar="PATTERN",
                     help="label image per stack whose objects are prompts (default {dir}/{stem}_seeds.tif; "
                          "give a pattern as --seeds=PATTERN); a 2D one prompts the middle slice")
    how.add_argument("--session", metavar="FILE", help="a saved .sam2.json whose prompts and propagations run on every stack")
    b.add_argument("--format", choices=["tif", "ome-zarr"], default="tif",
                   help="label TIFFs (default) or OME-Zarr folders (for stacks too large for one TIFF)")
    _add_cluster_options(b)
    _add_model_options(b, device="cpu", overwrite=False)
    b.add_argument("--stop-after", type=int, default=3, metavar="N",
                   help="stop following an object after N slices where it is absent (default 3; 0: never)")
    b.add_argument("--roi", metavar="auto|ROW0:ROW1,COL0:COL1",
                   help="track clicks and seeds on a region instead of whole slices: 'auto' gives each object a "
                        "square of the model's input size around its prompts (small objects in large frames keep "
                        "their detail), or one rectangle of every slice")

    bx = sub.add_parser(
        "box", help="MedSAM2's protocol: a box on a key slice, tracked both ways, the largest 3D part kept",
        description="One lesion or organ of a volume from one box on its key slice: tracked forward, and "
        "separately backward, from the box; the union's largest 3D connected part is written. For CT and MR "
        "use --model medsam2 (MedSAM2's weights are downloaded on first use, or give --checkpoint "
        "MedSAM2_latest.pt) and a --window.",
    )
    bx.add_argument("image", type=Path, help="a volume: NIfTI (.nii, .nii.gz) or a TIFF stack (Z, Y, X)")
    bx.add_argument("--box", type=_parse_box, required=True, help="box X0,Y0,X1,Y1 in pixels of the key slice")
    bx.add_argument("--slice", type=int, required=True, help="the key slice (from 0) the box is drawn on")
    bx.add_argument("-o", "--output", type=Path, required=True,
                    help="mask to write: NIfTI (.nii.gz, with the source's geometry) or TIFF")
    bx.add_argument("--window", help="intensity window instead of --range: soft-tissue, lung, bone, brain, or mr")
    bx.add_argument("--all-parts", action="store_true", help="keep every connected part, not only the largest")
    _add_model_options(bx)

    mv = sub.add_parser(
        "movie", help="follow objects through z and over time in a T-Z-Y-X movie, prompted at the first time point",
        description="The first time point is segmented from clicks, seeds or segment everything; every later "
        "time point's z-stack is seeded from the previous one's result, so objects keep their ids over time.",
    )
    mv.add_argument("movie", type=Path, help="a T-Z-Y-X TIFF (time first, then z)")
    mv.add_argument("-o", "--output", type=Path, required=True, help="label TIFF to write (T-Z-Y-X)")
    first = mv.add_mutually_exclusive_group(required=True)
    first.add_argument("--points", type=Path, metavar="CSV",
                       help="clicks at the first time point: columns slice,y,x,object,positive (slices from 0)")
    first.add_argument("--seeds", type=Path, metavar="LABELS", help="a Z-Y-X label volume of the first time point")
    first.add_argument("--auto", action="store_true", help="segment everything at the first time point")
    mv.add_argument("--stop-after", type=int, default=2, metavar="N",
                    help="stop following an object in z after N slices where it is absent (default 2; 0: never)")
    _add_orientations(mv)
    _add_model_options(mv)
    mv.add_argument("--quiet", action="store_true", help="no progress bar")

    em = sub.add_parser(
        "embed", help="compute the image features of every slice once, into STACK.sam2.zarr",
        description="Runs the image encoder on every slice of a stack and stores the features (zarr, float32, "
        "one chunk per slice) with the model's identity and the intensity mapping; sessions given the store "
        "read features from it instead of running the encoder.",
    )
    em.add_argument("stack", type=Path, help="a stack (N, H, W) TIFF")
    em.add_argument("--out", type=Path, help="the store to write (default: STACK.sam2.zarr beside the stack)")
    _add_model_options(em, device="cpu", fast=False, overwrite=False)
    _add_cluster_options(em)

    t = sub.add_parser(
        "train",
        help="train or fine-tune a model on stacks with instance labels",
        description="Train (--init scratch) or fine-tune (--init pretrained, or a weights file) on "
        "stacks with instance label images. Writes OUT/checkpoint.pt (resume with --resume), "
        "OUT/weights.pt (use it with --checkpoint in the widget or CLI) and OUT/history.json.",
    )
    t.add_argument("--pair", nargs=2, action="append", default=[], type=Path, metavar=("IMAGE", "LABELS"),
                   help="an image stack and its label stack, same shape (repeatable)")
    t.add_argument("--synthetic", type=int, default=0, metavar="N", help="add N generated stacks (seeds 1000..)")
    t.add_argument("--out", type=Path, required=True, help="folder for checkpoints and history")
    t.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name (default {DEFAULT_MODEL})")
    t.add_argument("--init", default="pretrained", help="scratch, pretrained (default) or a weights file")
    defaults = TrainConfig()  # one set of training defaults, the API's
    t.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default {defaults.epochs}")
    t.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch,
                   help=f"default {defaults.steps_per_epoch}")
    t.add_argument("--clip-length", type=int, default=defaults.clip_length,
                   help=f"consecutive slices per clip (default {defaults.clip_length})")
    t.add_argument("--clips-per-step", type=int, default=defaults.clips_per_step,
                   help=f"default {defaults.clips_per_step}")
    t.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.lr:g} from scratch, "
                                            f"{FINE_TUNE_LR:g} otherwise)")
    t.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help=f"share of stacks held out for validation (default {defaults.val_fraction:g})")
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    t.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")

    e = sub.add_parser("evaluate", help="one click per object on its middle slice, propagate, report 3D Dice")
    e.add_argument("--pair", nargs=2, action="append", default=[], type=Path, metavar=("IMAGE", "LABELS"),
                   help="an image stack (N, H, W) or (N, H, W, C) and its instance label stack (N, H, W), "
                        "0 = background (repeatable)")
    e.add_argument("--synthetic-seeds", type=int, nargs="*", default=[], metavar="SEED",
                   help="generated nuclei stacks with these seeds (training used 1000..1095, 5000..5011)")
    e.add_argument("--model", help=f"registry name (default: the one --checkpoint holds, else {DEFAULT_MODEL}, bundled)")
    e.add_argument("--checkpoint", type=Path, help="weights file (default: the model's own)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    e.add_argument("--fast", action="store_true", help="bfloat16 mode (faster on CPUs with AVX-512 BF16 / AMX and on GPUs)")
    e.add_argument("--stop-after", type=int, metavar="N",
                   help="stop following an object after N slices where the model finds it absent (default: never)")
    _add_orientations(e)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser().parse_args(_attach_negative_values(argv))
    from .model import CHECKPOINTS, MODELS
    from .model.errors import NapariSAM2Error

    try:
        if args.command == "models":
            from .model.checkpoint import BUNDLED

            for name, cfg in MODELS.items():
                url = CHECKPOINTS.get(name)
                if url:
                    where = url.url
                else:
                    where = "(bundled with the package)" if name in BUNDLED else "(bring your own checkpoint file)"
                print(f"{name:26s} SAM {cfg.version}  {cfg.image_size:4d}px  {where}")
            return 0
        commands = {"gui": _gui, "train": _train, "evaluate": _evaluate, "auto": _auto, "box": _box,
                    "movie": _movie, "batch": _batch, "embed": _embed}
        if args.command in commands:
            return commands[args.command](args)
        if args.command == "fetch":
            from .model.checkpoint import fetch_checkpoint

            if args.model not in CHECKPOINTS:
                print(f"error: no download for {args.model!r}; choose one of {', '.join(CHECKPOINTS)}", file=sys.stderr)
                return 2
            info = CHECKPOINTS[args.model]
            print(fetch_checkpoint(info.url, sha256=info.sha256))
            return 0
        return _segment(args)
    except (NapariSAM2Error, FileExistsError, FileNotFoundError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line
        return 1


def _check_model(name: Optional[str]) -> None:
    """An unknown --model fails at once, listing the registered names."""
    from .model import InputError

    if name is not None and name not in MODELS:
        raise InputError(
            f"unknown model {name!r}; choose one of {', '.join(MODELS)} (`napari-sam2 models` lists them)"
        )


def _check_checkpoint(path: Optional[Path]) -> None:
    from .model import InputError

    if path is not None and not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise InputError(f"checkpoint {path} {what}; pass the path of a .pt checkpoint file")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _check_readable(path: Path, what: str) -> None:
    from .model import InputError

    if not path.exists():
        raise InputError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give an image file (TIFF, PNG, JPEG)")


def _unreadable(path: Path, what: str, err: BaseException):
    from .model import InputError

    detail = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return InputError(f"cannot read {what} file {path} ({detail}); it must be an image file: TIFF, PNG or JPEG")


def _check_array(shape: tuple, dtype, path: Path, what: str) -> None:
    import numpy as np

    from .model import InputError

    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise InputError(f"{what} {path} holds {dtype} data, not pixel values; give a TIFF, PNG or JPEG image")
    if len(shape) < 2:
        raise InputError(
            f"{what} {path} holds a {len(shape)}D array of shape {tuple(shape)}; "
            "an image needs at least 2 dimensions (Y, X)"
        )


def _read_image(path: Path, what: str = "image"):
    """read_image, with a missing, unreadable, NIfTI or 1D file turned into a one-line InputError."""
    from .io import read_image

    _check_readable(path, what)
    try:
        data = read_image(path)
    except (ValueError, OSError) as err:  # tifffile, imageio and Pillow raise these for files they cannot parse
        raise _unreadable(path, what, err) from err
    _check_array(data.shape, data.dtype, path, what)
    return data


def _check_image_file(path: Path, what: str = "image") -> None:
    """What _read_image checks, reading only the header of a TIFF (stacks can be large)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        _read_image(path, what)
        return
    import tifffile

    _check_readable(path, what)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ValueError("no image data")
            series = tif.series[0]
            shape, dtype = tuple(series.shape), series.dtype
    except (ValueError, OSError) as err:
        raise _unreadable(path, what, err) from err
    _check_array(shape, dtype, path, what)


def _gui(args) -> int:
    # everything that can be checked is checked before a window opens
    _check_model(args.model)
    _check_checkpoint(args.checkpoint)
    if args.image is not None:
        if _is_nifti(args.image):
            from .medical import read_nifti

            read_nifti(args.image)  # a damaged file is refused before a window opens
        else:
            _check_image_file(args.image)
    import napari

    open_gui(args.image, model=args.model, checkpoint=args.checkpoint, orientations=args.orientations)
    napari.run()
    return 0


def _model_name(args) -> Optional[str]:
    """--model if given; else None (the architecture the --checkpoint file holds) or the default model."""
    if args.model:
        return args.model
    return None if args.checkpoint else DEFAULT_MODEL


def open_gui(
    image: Optional[Path] = None, *, model: Optional[str] = None, checkpoint: Optional[Path] = None,
    orientations: Optional[int] = None, viewer=None,
):
    """A viewer with ``image`` (default: the generated 3D nuclei) and the docked widget: (viewer, widget).

    With a model whose weights ship with the package the session starts at
    once, so the viewer opens ready for a click; other models start on "Start
    session" (their first use downloads the checkpoint).
    """
    import napari

    from .io import layer_kwargs, read_image_file
    from .model.checkpoint import BUNDLED
    from .sample_data import make_nuclei_3d
    from .widgets.sam2_widget import SAM2Widget

    if viewer is None:
        viewer = napari.Viewer(title="napari-sam2")
    if image is not None and _is_nifti(Path(image)):
        from .medical import napari_get_reader

        ((data, kwargs, _kind),) = napari_get_reader(str(image))(str(image))  # Z-Y-X, scaled by the voxel spacing
        layer = viewer.add_image(data, **kwargs)
    elif image is not None:
        # the file's axes and calibration (voxel size, frame interval) become the layer's
        im = read_image_file(image)
        layer = viewer.add_image(im.data, **layer_kwargs(im))
        if isinstance(layer, list):  # a channel axis: one layer per channel, the first one is segmented
            layer = layer[0]
    else:
        data, meta, _ = make_nuclei_3d()[0]
        layer = viewer.add_image(data, **meta)
    widget = SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="SAM 2", area="right")
    widget.configure(image=layer, model=model, checkpoint=checkpoint, orientations=orientations)
    if checkpoint is None and widget.model_choice in BUNDLED:
        widget.start()
    return viewer, widget


def _segment(args) -> int:
    import numpy as np

    from .io import tiff_path, write_labels
    from .model import ImagePredictor, InputError, load_model
    from .model.devices import pick_device

    target = tiff_path(args.output)  # what is written: ".tif" added to a bare name
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    _check_model(args.model)
    _check_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    image = _read_image(args.image)
    points = args.point + args.negative
    labels = [1] * len(args.point) + [0] * len(args.negative)
    model = load_model(_model_name(args), args.checkpoint, device=device)
    predictor = ImagePredictor(model, fast=args.fast)
    predictor.set_image(image, intensity_range=args.range)
    result = predictor.predict(
        points=points or None, labels=labels or None, box=args.box, multimask_output=len(points) == 1 and args.box is None
    )
    masks = result.masks if result.masks.ndim == 2 else result.masks[int(np.argmax(result.iou))]
    try:
        target = write_labels(args.output, masks.astype(np.uint16), overwrite=args.overwrite)
    except OSError as err:  # a folder that cannot be made or written to, a full disk
        raise InputError(
            f"cannot write {target} ({err.strerror or err}); choose a writable place with -o/--output"
        ) from err
    print(f"wrote {target} ({int(masks.sum())} pixels, predicted IoU {float(np.max(result.iou)):.2f})")
    return 0


def _auto(args) -> int:
    import numpy as np

    from .model import InputError, load_model
    from .model.auto_stack import is_single_image, segment_slice, segment_stack

    device, image = _prepare(args, args.image)
    _apply_window(args, image)
    if args.stop_after < 0:
        raise InputError(f"--stop-after must be 0 (never stop) or a number of slices, got {args.stop_after}")
    params = {"points_per_side": args.points_per_side, "stability_score_thresh": args.stability,
                  "pred_iou_thresh": args.pred_iou, "min_area": args.min_area}
    model = load_model(_model_name(args), args.checkpoint, device=device)
    two_d = is_single_image(image.shape)
    tile = None if args.tile.strip().lower() == "none" else (
        "auto" if args.tile.strip().lower() == "auto" else _positive_int(args.tile, "--tile"))
    if two_d:
        bar = None if args.quiet else _progress_bar(f"segmenting {args.image.name}", "tiles")
        labels = segment_slice(model, image, args.range, fast=args.fast, tile=tile, overlap=args.overlap,
                               progress=bar, **params)
        if bar is not None and bar.drawn:
            print(file=sys.stderr)
        depth = 1
    else:
        params.update(every=args.every, covered=args.covered, key_slice=args.key_slice,
                      stop_after_absent=args.stop_after or None)
        depth = image.shape[0]
        labels = np.zeros(image.shape[:3], np.uint32)
        bar = None if args.quiet else _progress_bar(f"segmenting {args.image.name}")
        try:
            segment_stack(model, image, args.range, fast=args.fast, out=labels,
                          progress=None if bar is None else (lambda e: bar(e.searched, e.total, e.frame)), **params)
        except KeyboardInterrupt:
            print("\ninterrupted: writing the slices done so far", file=sys.stderr)
        finally:
            if bar is not None and bar.drawn:
                print(file=sys.stderr)
    n = len(np.unique(labels)) - 1
    out = labels.astype(np.uint16) if labels.max() <= np.iinfo(np.uint16).max else labels
    if two_d and _is_nifti(args.output):
        raise InputError("NIfTI output needs a volume; write a 2D result as TIFF")
    target = _write_volume(args, out)  # NIfTI keeps the source's voxel order, affine and geometry
    print(f"wrote {target}: {n} objects" + ("" if two_d else f" through {depth} slices"))
    return 0


def _prepare(args, source: Path, what: str = "image"):
    """What the commands that read one image and write one output check first: the output
    is free (or --overwrite), the model, checkpoint and device exist; then the image is read.
    Returns (device, image)."""
    from .io import tiff_path
    from .model.devices import pick_device

    target = args.output if _is_nifti(args.output) else tiff_path(args.output)
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    _check_model(args.model)
    _check_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    return device, _read_image(source, what)


def _apply_window(args, image) -> None:
    """--window as the intensity range (--range and --window exclude each other)."""
    from .model import InputError

    if args.window:
        from .medical import ct_window, mr_window

        if args.range:
            raise InputError("give --window or --range, not both")
        args.range = mr_window(image) if args.window.lower() == "mr" else ct_window(args.window.replace("-", " "))


def _write_volume(args, volume) -> Path:
    """A label or mask volume to args.output: NIfTI with the source's geometry when the source
    is NIfTI, else TIFF."""
    from .io import write_labels
    from .model import InputError

    try:
        if _is_nifti(args.output):
            from .medical import write_nifti_labels

            return write_nifti_labels(args.output, volume, reference=args.image if _is_nifti(args.image) else None,
                                      overwrite=args.overwrite)
        return write_labels(args.output, volume, overwrite=args.overwrite)
    except OSError as err:
        raise InputError(f"cannot write {args.output} ({err.strerror or err}); choose a writable place with "
                         "-o/--output") from err


def _box(args) -> int:
    import numpy as np

    from .medical import box_protocol
    from .model import InputError, load_model

    device, image = _prepare(args, args.image)
    if image.ndim != 3:
        raise InputError(f"{args.image} has shape {image.shape}: the box protocol needs a volume (Z, Y, X)")
    _apply_window(args, image)
    model = load_model(_model_name(args), args.checkpoint, device=device)
    bar = _progress_bar(f"tracking the box through {args.image.name}", "slices")
    mask = box_protocol(model, image, args.box, args.slice, intensity_range=args.range,
                        largest_component=not args.all_parts, fast=args.fast, progress=bar)
    if bar.drawn:
        print(file=sys.stderr)
    target = _write_volume(args, mask.astype(np.uint8))
    print(f"wrote {target}: {int(mask.sum())} voxels on {int(mask.any(axis=(1, 2)).sum())} slices")
    return 0


def _movie(args) -> int:
    import numpy as np

    from .batch import read_points_csv
    from .io import read_image, write_labels
    from .model import InputError, load_model
    from .model.movie import segment_movie

    if args.stop_after < 0:
        raise InputError(f"--stop-after must be 0 (never stop) or a number of slices, got {args.stop_after}")
    device, movie = _prepare(args, args.movie, "movie")
    if movie.ndim != 4:
        raise InputError(f"{args.movie} has shape {movie.shape}: a movie is T-Z-Y-X (4 axes); for a z-stack or a "
                         "2D time-lapse use napari-sam2 auto or batch")
    prompts: dict = {}
    if args.points is not None:
        _check_readable(args.points, "clicks CSV")
        prompts["points"] = read_points_csv(args.points, movie.shape[1], movie.shape[2:4])
    elif args.seeds is not None:
        prompts["seeds"] = np.asarray(read_image(args.seeds))
    else:
        prompts["auto"] = {}
    model = load_model(_model_name(args), args.checkpoint, device=device)
    labels = np.zeros(movie.shape, np.uint32)
    bar = None if args.quiet else _progress_bar(f"following objects in {args.movie.name}", "time points")
    try:
        from .model.ensemble import default_orientations

        orientations = args.orientations or default_orientations(model.config.name)
        segment_movie(model, movie, **prompts, intensity_range=args.range, orientations=orientations,
                      fast=args.fast, stop_after_absent=args.stop_after or None, out=labels,
                      progress=None if bar is None else (lambda e: bar(e.time + 1, e.total)))
    except KeyboardInterrupt:
        print("\ninterrupted: writing the time points done so far", file=sys.stderr)
    finally:
        if bar is not None and bar.drawn:
            print(file=sys.stderr)
    out = labels.astype(np.uint16) if labels.max() <= np.iinfo(np.uint16).max else labels
    target = write_labels(args.output, out, axes="TZYX", overwrite=args.overwrite)
    n = len(np.unique(labels)) - 1
    print(f"wrote {target}: {n} objects through {movie.shape[0]} time points")
    return 0


def _batch(args) -> int:
    from .batch import BatchSettings, plan_batch, run_batch
    from .model import InputError

    _check_model(args.model)
    _check_checkpoint(args.checkpoint)
    if args.stop_after < 0:
        raise InputError(f"--stop-after must be 0 (never stop) or a number of slices, got {args.stop_after}")
    if args.workers < 0:
        raise InputError(f"--workers must be 0 (here) or more, got {args.workers}")
    from .model.devices import pick_device

    checked = str(pick_device(args.device))  # an unknown or absent device is refused here, in one line
    if not args.scheduler:  # on a remote cluster each worker resolves "auto" itself
        args.device = checked
    if args.auto:
        kind, source = "auto", None
    elif args.points:
        kind, source = "points", args.points
    elif args.seeds:
        kind, source = "seeds", args.seeds
    else:
        kind, source = "session", args.session
    items = plan_batch(args.inputs, args.out_dir, kind, source=source, fmt=args.format)
    settings = BatchSettings(model=_model_name(args), checkpoint=None if args.checkpoint is None else str(args.checkpoint),
                             device=args.device, fast=args.fast,
                             intensity_range=None if args.range is None else tuple(args.range),
                             stop_after=args.stop_after or None, roi=_check_roi(args.roi, kind))
    bar = _progress_bar("batch", "stacks finished")
    counts = {"done": 0, "skipped": 0, "failed": 0}

    def on_result(r, done, total):
        counts[r.status] += 1
        if bar.drawn:
            print(file=sys.stderr)
            bar.drawn = False
        where = f" on {r.worker}" if r.worker else ""
        what = {"done": f"{r.objects} objects, {r.seconds:.1f} s{where}", "skipped": "finished before, skipped",
                "failed": f"FAILED: {r.error}"}[r.status]
        print(f"[{done}/{total}] {r.image} -> {r.output}: {what}", file=sys.stderr if r.status == "failed" else sys.stdout,
              flush=True)

    try:
        results = run_batch(items, settings, workers=args.workers, scheduler=args.scheduler, on_result=on_result,
                            on_slice=lambda z: bar(counts["done"] + counts["skipped"] + counts["failed"], len(items), z),
                            on_dashboard=lambda link: print(f"dask dashboard: {link}", flush=True))
    except KeyboardInterrupt:
        print(f"\ninterrupted: {counts['done'] + counts['skipped']} stacks finished; run the same command again to "
              "resume", file=sys.stderr)
        return 130
    except (OSError, TimeoutError) as err:
        if not (args.scheduler or args.workers):
            raise InputError(str(err)) from None  # e.g. a checkpoint that cannot be read or fetched
        raise InputError(f"the dask cluster ({args.scheduler or 'local'}) failed: {err}") from None
    print(f"{counts['done']} done, {counts['skipped']} skipped (finished before), {counts['failed']} failed "
          f"of {len(results)} stacks")
    return 1 if counts["failed"] else 0


def _positive_int(text: str, option: str) -> int:
    from .model import InputError

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"{option} takes a number of pixels, 'auto' or 'none', got {text!r}")
    return value


def _check_roi(text: Optional[str], kind: str) -> Optional[str]:
    """--roi as BatchSettings takes it ("auto" or "ROW0:ROW1,COL0:COL1"), checked."""
    from .model import InputError
    from .model.roi import Roi

    if text is None:
        return None
    if kind not in ("points", "seeds"):
        raise InputError("--roi applies to --points and --seeds (a saved session keeps its objects' own regions)")
    if text.strip().lower() == "auto":
        return "auto"
    return str(Roi.parse(text))


def _embed(args) -> int:
    import functools

    from .batch import BatchSettings, get_model
    from .model import InputError
    from .model.frames import FrameSource
    from .store import build_store, store_path

    _check_model(args.model)
    _check_checkpoint(args.checkpoint)
    if args.workers < 0:
        raise InputError(f"--workers must be 0 (here) or more, got {args.workers}")
    from .model.devices import pick_device

    args.device = str(pick_device(args.device))
    out = args.out or store_path(args.stack)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it to build the store again")
    settings = BatchSettings(model=_model_name(args), checkpoint=None if args.checkpoint is None else str(args.checkpoint),
                             device=args.device)
    model = get_model(settings)
    frames = FrameSource.for_model(model, _read_image(args.stack), args.range)
    bar = _progress_bar(f"embedding {args.stack.name}", "slices")
    client = cluster = None
    try:
        if args.workers or args.scheduler:
            import logging

            from distributed import Client, LocalCluster

            if args.scheduler:
                client = Client(args.scheduler)
            else:
                cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=logging.WARNING)
                client = Client(cluster)
            print(f"dask dashboard: {client.dashboard_link}", flush=True)
        build_store(out, model, frames, client=client, stack_path=str(args.stack.resolve()),
                    load=functools.partial(get_model, settings), progress=lambda d, n: bar(d, n, d - 1))
    except (OSError, TimeoutError, RuntimeError, IndexError) as err:  # an unreachable scheduler, a folder not writable
        raise InputError(f"could not build {out}: {err}") from None
    finally:
        if bar.drawn:
            print(file=sys.stderr)
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    print(f"wrote {out} ({len(frames)} slices)")
    return 0


def _progress_bar(what: str, unit: str = "slices searched"):
    """A one-line progress bar on stderr: bar(done, total, slice); bar.drawn once it showed."""
    def show(done: int, total: int, frame: Optional[int] = None) -> None:
        show.drawn = True
        width = 30
        filled = int(width * done / max(total, 1))
        now = "" if frame is None else f", now slice {frame}"
        print(f"\r{what}: [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit}{now}   ",
              end="", file=sys.stderr, flush=True)
    show.drawn = False
    return show


def _read_pair(image_path: Path, label_path: Path):
    """An image stack and its label stack, checked to match: (image, labels)."""
    from .model import InputError

    image = _read_image(image_path, "image")
    labels = _read_image(label_path, "labels")
    want = image.shape[:3] if image.ndim == 4 else image.shape
    if labels.shape != want:
        raise InputError(
            f"labels {label_path} have shape {labels.shape}, but image {image_path} has shape {image.shape}; "
            f"give the label stack made for this image (shape {want}, one label per pixel)"
        )
    return image, labels


def _read_pairs(pairs, size: int, percentiles) -> list:
    from .training import prepare_stack

    stacks = []
    for image_path, label_path in pairs:
        print(f"reading {image_path} with labels {label_path}")
        stacks.append(prepare_stack(*_read_pair(image_path, label_path), size, name=image_path.name,
                                    percentiles=percentiles))
    return stacks


def _train(args) -> int:
    from .model.config import get_config
    from .model.devices import pick_device
    from .sample_data import random_stack
    from .training import FINE_TUNE_LR, TrainConfig, TrainingError, prepare_stack, train

    if not args.pair and args.synthetic <= 0:
        raise TrainingError("no data: give --pair IMAGE LABELS (repeatable) and/or --synthetic N")
    _check_model(args.model)
    device = pick_device(args.device)
    model_cfg = get_config(args.model)  # stacks are mapped as the model's profile says
    size, percentiles = model_cfg.image_size, model_cfg.profile.percentiles
    stacks = _read_pairs(args.pair, size, percentiles)
    stacks += [prepare_stack(*random_stack(s), size, name=f"seed {s}", percentiles=percentiles)
               for s in range(1000, 1000 + args.synthetic)]
    cfg = TrainConfig(
        model=args.model, init=args.init, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        clip_length=args.clip_length, clips_per_step=args.clips_per_step,
        val_fraction=args.val_fraction, seed=args.seed, device=str(device), bf16=args.bf16,
    )
    if args.lr is not None or args.init != "scratch":
        cfg = cfg.replace(lr=args.lr if args.lr is not None else FINE_TUNE_LR)
    train(cfg, stacks, args.out, resume=args.resume)
    return 0


def _evaluate(args) -> int:
    import numpy as np

    from .model import InputError, load_model
    from .model.devices import pick_device
    from .model.ensemble import default_orientations
    from .model.evaluate import click_and_propagate, slice_table
    from .sample_data import nuclei_3d

    if args.stop_after is not None and args.stop_after < 1:
        raise InputError(f"--stop-after must be 1 or more (slices), got {args.stop_after}; leave it out to never stop")

    if not args.pair and not args.synthetic_seeds:
        raise InputError("no data: give --pair IMAGE LABELS and/or --synthetic-seeds SEED ...")
    _check_model(args.model)
    _check_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    # the files are read and checked before the (maybe slow) model load
    data = []
    for image_path, label_path in args.pair:
        image, labels = _read_pair(image_path, label_path)
        if not labels.any():
            raise InputError(f"labels {label_path} are all background (0); there is no object to evaluate")
        data.append((image_path.name, image, labels))
    data += [(f"nuclei seed {s}", *nuclei_3d(seed=s)) for s in args.synthetic_seeds]
    model = load_model(_model_name(args), args.checkpoint, device=device)
    orientations = args.orientations or default_orientations(model.config.name)
    everything = []
    for name, image, labels in data:
        scores = click_and_propagate(model, image, labels, fast=args.fast, orientations=orientations,
                                     stop_after_absent=args.stop_after)
        everything += scores
        print(f"{name}: {len(scores)} objects, mean 3D Dice {np.mean([s.dice_3d for s in scores]):.3f}")
    print(f"all: {len(everything)} objects, {orientations} orientation(s), mean 3D Dice {np.mean([s.dice_3d for s in everything]):.3f}")
    print("distance from click  mean Dice  slices")
    for d, m, n in slice_table(everything):
        print(f"{d:20d}  {m:9.3f}  {n:6d}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
