"""Command line: ``napari-sam2 models``, ``napari-sam2 fetch``, ``napari-sam2 segment``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-sam2", description="Segment Anything 2 for microscopy images and stacks")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the registered models and their download URLs")

    g = sub.add_parser("gui", help="open napari with the SAM 2 widget (and generated sample data)")
    g.add_argument("image", nargs="?", type=Path, help="an image or stack to open (default: generated 3D nuclei)")
    g.add_argument("--model", default=None, help="registry name, e.g. sam2.1_hiera_small")
    g.add_argument("--checkpoint", type=Path, help="local checkpoint file")

    f = sub.add_parser("fetch", help="download an official checkpoint into the cache")
    f.add_argument("model", help="registry name, e.g. sam2.1_hiera_tiny")

    s = sub.add_parser("segment", help="segment one 2D image from clicks and/or a box, write a label TIFF")
    s.add_argument("image", type=Path, help="a 2D TIFF (or any file tifffile/scikit-image reads)")
    s.add_argument("-o", "--output", type=Path, required=True, help="label TIFF to write")
    s.add_argument("--point", type=_parse_xy, action="append", default=[], help="positive click X,Y (repeatable)")
    s.add_argument("--negative", type=_parse_xy, action="append", default=[], help="negative click X,Y (repeatable)")
    s.add_argument("--box", type=_parse_box, help="box X0,Y0,X1,Y1")
    s.add_argument("--model", default="sam2.1_hiera_tiny")
    s.add_argument("--checkpoint", type=Path, help="local checkpoint file (default: download the official one)")
    s.add_argument("--range", nargs=2, type=float, metavar=("LOW", "HIGH"), help="intensity range mapped to black..white")
    s.add_argument("--fast", action="store_true", help="bfloat16 mode (faster on CPUs with AVX-512 BF16 / AMX and on GPUs)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .model import CHECKPOINTS, MODELS, CheckpointError, InputError

    try:
        if args.command == "models":
            for name, cfg in MODELS.items():
                url = CHECKPOINTS.get(name)
                print(f"{name:26s} SAM {cfg.version}  {cfg.image_size:4d}px  {url.url if url else '(bring your own checkpoint file)'}")
            return 0
        if args.command == "gui":
            return _gui(args)
        if args.command == "fetch":
            from .model.checkpoint import fetch_checkpoint

            if args.model not in CHECKPOINTS:
                print(f"error: no download for {args.model!r}; choose one of {', '.join(CHECKPOINTS)}", file=sys.stderr)
                return 2
            info = CHECKPOINTS[args.model]
            print(fetch_checkpoint(info.url, sha256=info.sha256))
            return 0
        return _segment(args)
    except (CheckpointError, InputError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _gui(args) -> int:
    import napari

    from .io import read_image
    from .sample_data import make_nuclei_3d
    from .widgets.sam2_widget import CHOOSE_FILE, SAM2Widget

    viewer = napari.Viewer(title="napari-sam2")
    if args.image is not None:
        layer = viewer.add_image(read_image(args.image), name=args.image.stem)
    else:
        data, meta, _ = make_nuclei_3d()[0]
        layer = viewer.add_image(data, **meta)
    widget = SAM2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="SAM 2", area="right")
    widget._image_combo.value = layer
    if args.checkpoint is not None:
        widget._model_combo.value = CHOOSE_FILE
        widget._checkpoint.value = str(args.checkpoint)
    elif args.model:
        widget._model_combo.value = args.model
    napari.run()
    return 0


def _segment(args) -> int:
    import numpy as np

    from .io import read_image, write_labels
    from .model import ImagePredictor, load_model
    from .model.devices import pick_device

    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    image = read_image(args.image)
    points = args.point + args.negative
    labels = [1] * len(args.point) + [0] * len(args.negative)
    model = load_model(args.model, args.checkpoint, device=pick_device(args.device))
    predictor = ImagePredictor(model, fast=args.fast)
    predictor.set_image(image, intensity_range=args.range)
    result = predictor.predict(
        points=points or None, labels=labels or None, box=args.box, multimask_output=len(points) == 1 and args.box is None
    )
    masks = result.masks if result.masks.ndim == 2 else result.masks[int(np.argmax(result.iou))]
    write_labels(args.output, masks.astype(np.uint16), overwrite=args.overwrite)
    print(f"wrote {args.output} ({int(masks.sum())} pixels, predicted IoU {float(np.max(result.iou)):.2f})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
