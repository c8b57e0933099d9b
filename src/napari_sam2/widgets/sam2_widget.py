"""The SAM 2 dock widget: click on a slice, propagate through the stack into Labels.

The widget only translates layer events into :class:`~napari_sam2.segmenter.StackSegmenter`
calls and results into the Labels layer. All model work runs in napari thread
workers; every failure becomes a napari notification.

Keys (on the widget's own layers): ``N`` new object, ``T`` toggle click polarity,
``Shift+F`` / ``Shift+B`` / ``Shift+A`` propagate forward / backward / both ways,
``Escape`` cancel a propagation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    PushButton,
)

from ..model.config import DEFAULT_MODEL
from ..model.ensemble import default_orientations
from ..model.preprocess import InputError

CHOOSE_FILE = "choose a checkpoint file…"
ORIENTATION_ITEMS = [("1 (plain SAM 2)", 1), ("2", 2), ("4", 4), ("8 (most accurate)", 8)]
POSITIVE_COLOR, NEGATIVE_COLOR = "#33ff33", "#ff3355"


def _notify_error(msg: str) -> None:
    from napari.utils.notifications import show_error

    show_error(msg)


def _notify_info(msg: str) -> None:
    from napari.utils.notifications import show_info

    show_info(msg)


class SAM2Widget(Container):
    """Dock widget. ``viewer`` is the napari viewer it serves."""

    def __init__(self, viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        from ..model.config import MODELS

        self._image_combo = ComboBox(label="Image", choices=self._image_choices, nullable=True)
        self._model_combo = ComboBox(label="Model", choices=[*MODELS, CHOOSE_FILE], value=DEFAULT_MODEL)
        self._checkpoint = FileEdit(label="Checkpoint file", mode="r", filter="*.pt *.pth", value="")
        self._checkpoint.visible = False
        self._device_combo = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._fast = CheckBox(text="Fast mode (bfloat16)", value=False)
        self._orientations = ComboBox(
            label="Orientations", choices=ORIENTATION_ITEMS, value=default_orientations(DEFAULT_MODEL),
            tooltip="Track in several rotated and mirrored views and average them: more accurate, "
            "that many times the work. Applies from the next Start session.",
        )
        self._axis_combo = ComboBox(label="Propagate along", choices=self._axis_choices)
        self._output_combo = ComboBox(label="Write into", choices=self._output_choices)
        self._start_btn = PushButton(text="Start session")
        self._new_obj_btn = PushButton(text="New object [N]")
        self._polarity_btn = PushButton(text="Clicks: positive [T]")
        self._fwd_btn = PushButton(text="Propagate ▶ [Shift+F]")
        self._back_btn = PushButton(text="◀ Propagate [Shift+B]")
        self._both_btn = PushButton(text="◀ Propagate both ▶ [Shift+A]")
        self._cancel_btn = PushButton(text="Cancel [Esc]", enabled=False)
        self._axes_edit = LineEdit(label="Axes for TIFF", value="")
        self._save_btn = PushButton(text="Save labels…")
        self._status = Label(value="Choose an image, then Start session.")
        self.extend([
            self._image_combo, self._model_combo, self._checkpoint, self._device_combo, self._fast, self._orientations,
            self._axis_combo, self._output_combo, self._start_btn, self._new_obj_btn, self._polarity_btn, self._fwd_btn,
            self._back_btn, self._both_btn, self._cancel_btn, self._axes_edit, self._save_btn, self._status,
        ])
        # state
        self._model = None  # a loaded SAM2Model; tests may set it directly
        self._model_key = None
        self._segmenter = None
        self._image_layer = None
        self._points = self._shapes = self._labels = None
        self._positive = True
        self._busy = None  # running worker
        self._pending: "dict" = {}  # request key -> (work, done, what, quiet); newer replaces older
        self._propagation = None
        self._progress = None
        self._writing = False
        self._cancelled = False
        self._sent: dict = {}  # (object, position) -> prompts last sent to the engine
        # wiring
        self._model_combo.changed.connect(self._on_model_choice)
        self._start_btn.changed.connect(lambda: self.start())
        self._new_obj_btn.changed.connect(lambda: self.new_object())
        self._polarity_btn.changed.connect(lambda: self.toggle_polarity())
        self._fwd_btn.changed.connect(lambda: self.propagate("forward"))
        self._back_btn.changed.connect(lambda: self.propagate("backward"))
        self._both_btn.changed.connect(lambda: self.propagate("both"))
        self._cancel_btn.changed.connect(lambda: self.cancel())
        self._save_btn.changed.connect(lambda: self._save_dialog())
        self._image_combo.changed.connect(lambda: (self._axis_combo.reset_choices(), self._output_combo.reset_choices()))
        viewer.layers.events.inserted.connect(self._refresh_choices)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        viewer.dims.events.current_step.connect(self._on_step)

    # ------------------------------------------------------------------ choices

    def _image_choices(self, _w=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _axis_choices(self, _w=None):
        layer = self._image_combo.value
        if layer is None:
            return [("none (2D)", None)]
        nd = layer.ndim
        displayed = set(self._viewer.dims.displayed[-2:]) if self._viewer.dims.ndim == nd else {nd - 2, nd - 1}
        names = self._viewer.dims.axis_labels if self._viewer.dims.ndim == nd else [str(i) for i in range(nd)]
        def name(a):  # napari's default axis labels are just numbers
            n = str(names[a])
            return f"axis {a}" if n.lstrip("-").isdigit() else f"axis {a} ({n})"

        axes = [(f"{name(a)}, {layer.data.shape[a]} slices", a) for a in range(nd) if a not in displayed]
        return axes or [("none (2D)", None)]

    def _output_choices(self, _w=None):
        """A new Labels layer, or any existing one of the image's shape."""
        from napari.layers import Labels

        choices = [("a new Labels layer", None)]
        layer = self._image_combo.value
        if layer is not None:
            shape = tuple(layer.data.shape[:-1] if layer.rgb else layer.data.shape)
            choices += [(lab.name, lab) for lab in self._viewer.layers if isinstance(lab, Labels) and lab.data.shape == shape]
        return choices

    def _refresh_choices(self, event=None) -> None:
        self._image_combo.reset_choices()
        self._axis_combo.reset_choices()
        self._output_combo.reset_choices()

    def _on_model_choice(self, value) -> None:
        # the file field (with its Browse button) appears only for "choose a checkpoint file…"
        self._checkpoint.visible = value == CHOOSE_FILE
        self._orientations.value = default_orientations(value)

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        self._refresh_choices()
        if layer is self._image_layer:
            self.cancel()
            self._segmenter = None
            self._image_layer = None
            self._sent.clear()
            self._set_status("The image layer was removed; the session ended. Choose an image and Start session.")
            _notify_info("napari-sam2: the image layer was removed, so the session ended. Labels computed so far are kept.")
        for attr in ("_points", "_shapes", "_labels"):
            if getattr(self, attr) is layer:
                setattr(self, attr, None)

    def _set_status(self, text: str) -> None:
        self._status.value = text

    # ------------------------------------------------------------------ session

    def _load_model(self):
        """Load (or reuse) the chosen model; raises with a plain message."""
        from ..model import load_model
        from ..model.devices import pick_device

        name = self._model_combo.value
        ckpt = str(self._checkpoint.value) if str(self._checkpoint.value) not in ("", ".") else None
        if name == CHOOSE_FILE:
            if not ckpt:
                raise InputError("choose a checkpoint file first")
            name = None  # the architecture the file holds
        key = (name, ckpt, self._device_combo.value)
        if self._model is not None and (self._model_key is None or self._model_key == key):
            return self._model
        device = pick_device(self._device_combo.value)
        self._model = load_model(name, ckpt, device=device)
        self._model_key = key
        return self._model

    def start(self) -> None:
        """Load the model (in a worker) and set up prompt layers for the chosen image."""
        layer = self._image_combo.value
        if layer is None:
            _notify_error("napari-sam2: choose an image layer first.")
            return
        self._set_status("Loading the model…")

        def work():
            return self._load_model()

        def done(model):
            try:
                self._begin(layer, model)
            except InputError as err:
                _notify_error(f"napari-sam2: {err}")
                self._set_status(str(err))

        self._run(work, done, what="loading the model", key=("load",))

    def _begin(self, layer, model) -> None:
        from ..segmenter import StackSegmenter

        dims = self._viewer.dims
        nd = layer.ndim
        displayed = tuple(dims.displayed[-2:]) if dims.ndim == nd else (nd - 2, nd - 1)
        axis = self._axis_combo.value if nd > 2 else None
        if nd > 2 and dims.ndisplay != 2:
            raise InputError("switch the viewer to 2D view to give prompts")
        self._image_layer = layer
        self._sent.clear()
        self._segmenter = StackSegmenter(
            model, layer.data, rgb=layer.rgb, axis=axis, displayed=displayed,
            intensity_range=tuple(layer.contrast_limits) if not layer.rgb else None,
            fast=self._fast.value, corrections_as_conditioning=True, orientations=self._orientations.value,
        )
        self._make_layers(layer)
        if not self._axes_edit.value:
            self._axes_edit.value = self._guess_axes(layer)
        self._set_status(
            f"Click on an object (positive: left click; T toggles negative). Label {self._labels.selected_label} is active."
        )
        self._prefetch()

    def _guess_axes(self, layer) -> str:
        nd = layer.ndim
        labels = [str(a).upper() for a in self._viewer.dims.axis_labels][-nd:] if self._viewer.dims.ndim == nd else []
        if labels and all(a in "TZCYX" for a in labels) and len(set(labels)) == nd:
            return "".join(labels)
        return {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TZCYX"}.get(nd, "")

    def _make_layers(self, image) -> None:
        v = self._viewer
        nd = image.ndim
        shape = image.data.shape[:-1] if image.rgb else image.data.shape
        chosen = self._output_combo.value
        if chosen is not None and chosen is not self._labels:
            if self._labels is not None:
                self._labels.events.paint.disconnect(self._on_paint)
            self._labels = chosen  # the user's own Labels layer: existing labels are kept
            self._labels.events.paint.connect(self._on_paint)
            if self._labels.data.dtype.itemsize < 2 or self._labels.data.max() == 0:
                self._labels.selected_label = max(1, int(self._labels.data.max()) + 1)
        elif self._labels is None or self._labels not in v.layers or self._labels.data.shape != tuple(shape):
            self._labels = v.add_labels(np.zeros(shape, np.uint16), name=f"{image.name} SAM2 labels", scale=image.scale[:nd], translate=image.translate[:nd])
            self._labels.selected_label = 1
            self._labels.events.paint.connect(self._on_paint)
        if self._shapes is None or self._shapes not in v.layers:
            self._shapes = v.add_shapes(ndim=nd, name=f"{image.name} SAM2 boxes", scale=image.scale[:nd], translate=image.translate[:nd],
                                        edge_color="yellow", face_color="transparent", edge_width=2)
            self._shapes.mode = "add_rectangle"
            self._shapes.events.data.connect(self._on_shapes)
        if self._points is None or self._points not in v.layers:
            self._points = v.add_points(
                ndim=nd, name=f"{image.name} SAM2 clicks", scale=image.scale[:nd], translate=image.translate[:nd],
                features={"positive": np.zeros(0, bool), "object": np.zeros(0, int)},
                face_color=POSITIVE_COLOR, size=8,
            )
            self._points.mode = "add"
            self._points.events.data.connect(self._on_points)
        for layer in (self._points, self._shapes, self._labels):
            layer.bind_key("n", lambda _l: self.new_object(), overwrite=True)
            layer.bind_key("t", lambda _l: self.toggle_polarity(), overwrite=True)
            layer.bind_key("Shift-F", lambda _l: self.propagate("forward"), overwrite=True)
            layer.bind_key("Shift-B", lambda _l: self.propagate("backward"), overwrite=True)
            layer.bind_key("Shift-A", lambda _l: self.propagate("both"), overwrite=True)
            layer.bind_key("Escape", lambda _l: self.cancel(), overwrite=True)
        self._labels.events.selected_label.connect(lambda e=None: self._sync_defaults())
        self._sync_defaults()
        v.layers.selection.active = self._points

    def _sync_defaults(self) -> None:
        """New clicks take the active object and the current polarity (and its colour)."""
        if self._points is None:
            return
        self._points.feature_defaults = {"positive": self._positive, "object": self.active_object}
        self._points.current_face_color = POSITIVE_COLOR if self._positive else NEGATIVE_COLOR

    # ------------------------------------------------------------------ objects

    @property
    def active_object(self) -> int:
        return int(self._labels.selected_label) if self._labels is not None else 1

    def new_object(self) -> int:
        """Start a new object with the next free label."""
        if self._labels is None:
            return 1
        used = int(self._labels.data.max()) if self._labels.data.size else 0
        if self._points is not None and len(self._points.features):
            used = max(used, int(self._points.features["object"].max()))
        self._labels.selected_label = used + 1
        self._sync_defaults()
        self._set_status(f"New object: label {used + 1}.")
        return used + 1

    def toggle_polarity(self) -> bool:
        self._positive = not self._positive
        self._polarity_btn.text = f"Clicks: {'positive' if self._positive else 'negative'} [T]"
        self._sync_defaults()
        return self._positive

    # ------------------------------------------------------------------ prompts -> masks

    def _position(self):
        return tuple(int(round(s)) for s in self._viewer.dims.current_step[-self._image_layer.ndim:])

    def _on_points(self, event) -> None:
        action = str(getattr(event, "action", "added"))
        if self._writing or action not in ("added", "removed", "changed") or self._segmenter is None:
            return
        # new points carry the active object and polarity (feature defaults); a removed
        # or moved point may belong to any object, so refresh every object on this slice
        objs = {self.active_object}
        if len(self._points.data):
            objs |= {int(o) for o in self._points.features["object"]}
        for obj in sorted(objs):
            self._segment_current(obj)

    def _on_shapes(self, event) -> None:
        action = str(getattr(event, "action", "added"))
        if self._writing or action not in ("added", "removed", "changed") or self._segmenter is None:
            return
        self._segment_current(self.active_object)

    def _prompts_on_slice(self, obj_id: int):
        """(rows_cols, labels, box corners or None) of one object on the current slice."""
        pos = np.asarray(self._position())
        seg = self._segmenter
        pts, labs = [], []
        if self._points is not None and len(self._points.data):
            data = self._points.data
            feats = self._points.features
            for p, pos_flag, obj in zip(data, feats["positive"], feats["object"]):
                if int(obj) != obj_id or not self._on_current_slice(p, pos):
                    continue
                pts.append([p[seg.displayed[0]], p[seg.displayed[1]]])
                labs.append(1 if pos_flag else 0)
        box = None
        if self._shapes is not None:
            for data, kind in zip(self._shapes.data, self._shapes.shape_type):
                if kind == "rectangle" and all(self._on_current_slice(c, pos) for c in data):
                    box = [[c[seg.displayed[0]], c[seg.displayed[1]]] for c in data]
        return pts, labs, box

    def _on_current_slice(self, coord, pos) -> bool:
        seg = self._segmenter
        for a in range(len(pos)):
            if a in seg.displayed:
                continue
            if int(round(coord[a])) != int(pos[a]):
                return False
        return True

    def _segment_current(self, obj_id: int) -> None:
        seg = self._segmenter
        pos = self._position()
        pts, labs, box = self._prompts_on_slice(obj_id)
        # re-sending the same prompts is not a no-op (SAM 2 feeds its previous mask
        # back in), so only objects whose prompts on this slice changed are re-run
        signature = (tuple(map(tuple, np.round(pts, 3))) if pts else (), tuple(labs),
                     tuple(map(tuple, np.round(box, 3))) if box else None)
        key = (obj_id, pos)
        if not pts and box is None:
            if self._sent.pop(key, None) is None:
                return  # nothing was ever sent for this object here
        elif self._sent.get(key) == signature:
            return
        else:
            self._sent[key] = signature

        def work():
            if box is not None:
                return seg.set_box(pos, obj_id, box, pts or None, labs or None)
            if pts:
                return seg.set_points(pos, obj_id, pts, labs)
            seg.forget_slice(pos, obj_id)
            return None

        def done(mask):
            index = seg.label_index(pos, seg.slice_of(pos))
            self._write({obj_id: np.zeros(self._labels.data[index].shape, bool) if mask is None else seg.to_data_order(mask)}, index)

        self._run(work, done, what="segmenting the slice", key=("segment", obj_id, pos))

    def _on_paint(self, event) -> None:
        """Painting with napari's brush into the Labels layer is a mask prompt."""
        if self._writing or self._segmenter is None:
            return
        seg = self._segmenter
        pos = self._position()
        index = seg.label_index(pos, seg.slice_of(pos))
        obj_id = self.active_object
        mask = self._labels.data[index] == obj_id
        if seg.displayed[0] > seg.displayed[1]:
            mask = mask.T
        if not mask.any():
            return

        def work():
            return seg.set_mask(pos, obj_id, mask)

        def done(result):
            self._write({obj_id: seg.to_data_order(result)}, index)

        self._run(work, done, what="using the painted mask", key=("paint", obj_id, pos))

    # ------------------------------------------------------------------ propagation

    def propagate(self, direction: str = "both") -> None:
        """Propagate all objects from their prompted slices; masks appear as they come."""
        from napari.utils import progress

        if self._segmenter is None:
            _notify_error("napari-sam2: start a session and give a prompt first.")
            return
        if self._propagation is not None:
            _notify_info("napari-sam2: a propagation is already running.")
            return
        seg = self._segmenter
        pos = self._position()
        try:
            if seg.axis is None:
                raise InputError("this image is 2D: there is no axis to propagate along")
            session = seg.session(pos)
            if not session.objects:
                raise InputError("give a prompt (a click, a box or a painted mask) before propagating")
        except InputError as err:
            _notify_error(f"napari-sam2: {err}")
            return
        n = session.num_frames
        self._progress = progress(total=n, desc=f"SAM 2: propagating {direction}")  # closed when done
        self._cancel_btn.enabled = True

        def gen():
            yield from seg.propagate(pos, direction)

        def on_yield(item):
            index, masks = item
            self._write(masks, index)
            if self._progress is not None:
                self._progress.update(1)

        def finish(*_):
            if self._progress is not None:
                self._progress.close()
            self._progress = None
            self._propagation = None
            self._cancel_btn.enabled = False
            self._set_status("Propagation cancelled; slices done so far are kept." if self._cancelled else "Propagation finished.")
            self._cancelled = False

        self._cancelled = False
        worker = self._make_worker(gen, on_yield=on_yield, on_done=finish, what="propagating")
        self._propagation = worker
        worker.start()

    def cancel(self) -> None:
        """Stop a running propagation; slices already written stay."""
        if self._propagation is not None:
            self._cancelled = True
            self._propagation.quit()

    # ------------------------------------------------------------------ saving

    def save_labels(self, path, *, overwrite: bool = False) -> Path:
        """Write the Labels layer as a TIFF (axes from the Axes field, voxel size from the layer's scale)."""
        from ..io import write_labels

        if self._labels is None:
            raise InputError("there are no labels to save yet")
        axes = (self._axes_edit.value or "").upper() or None
        return write_labels(path, self._labels.data, axes=axes, spacing=tuple(self._labels.scale), overwrite=overwrite)

    def _save_dialog(self) -> None:
        from qtpy.QtWidgets import QFileDialog, QMessageBox

        if self._labels is None:
            _notify_error("napari-sam2: there are no labels to save yet.")
            return
        path, _ = QFileDialog.getSaveFileName(None, "Save labels", "labels.tif", "TIFF (*.tif *.tiff)")
        if not path:
            return
        overwrite = False
        if Path(path).exists():
            answer = QMessageBox.question(None, "Replace file?", f"{path} exists. Replace it?")
            if answer != QMessageBox.StandardButton.Yes:
                return
            overwrite = True
        try:
            self.save_labels(path, overwrite=overwrite)
            _notify_info(f"napari-sam2: saved {path}")
        except Exception as err:
            _notify_error(f"napari-sam2: could not save {path}: {err}")

    # ------------------------------------------------------------------ plumbing

    def _write(self, masks, index) -> None:
        from ..segmenter import write_masks

        if self._labels is None or self._labels not in self._viewer.layers:
            return
        self._writing = True
        try:
            write_masks(self._labels.data, index, masks)
            self._labels.refresh()
        finally:
            self._writing = False

    def _on_step(self, event=None) -> None:
        self._prefetch()

    def _prefetch(self) -> None:
        """Compute the embeddings of the slice on screen and its neighbours in the background."""
        seg = self._segmenter
        if seg is None or seg.axis is None or self._busy is not None or self._propagation is not None:
            return
        pos = self._position()
        s = seg.slice_of(pos)

        def work():
            seg.session(pos).prefetch([s, s + 1, s - 1])

        self._run(work, lambda _r: None, what="preparing slices", key=("prefetch",), quiet=True)

    def _run(self, work, done, *, what: str, key: tuple, quiet: bool = False) -> None:
        """Run ``work`` in a worker, one at a time; a queued request with the same key
        is replaced by the newer one (e.g. several quick clicks on one slice)."""
        if self._busy is not None:
            self._pending.pop(key, None)
            self._pending[key] = (work, done, what, quiet)
            return
        worker = self._make_worker(work, on_result=done, on_done=self._next, what=what, quiet=quiet)
        self._busy = worker
        worker.start()

    def _next(self, *_):
        self._busy = None
        if self._pending:
            key = next(iter(self._pending))
            work, done, what, quiet = self._pending.pop(key)
            self._run(work, done, what=what, key=key, quiet=quiet)

    @property
    def is_busy(self) -> bool:
        """Whether model work is running or queued."""
        return self._busy is not None or bool(self._pending) or self._propagation is not None

    def _make_worker(self, fn, *, on_result=None, on_yield=None, on_done=None, what: str, quiet=False):
        def on_error(err):
            msg = str(err) if isinstance(err, (InputError, ValueError, FileNotFoundError)) else f"{err.__class__.__name__}: {err}"
            if not quiet:
                _notify_error(f"napari-sam2: {what} failed: {msg}")
                self._set_status(f"Failed while {what}: {msg}")

        from napari.qt.threading import create_worker

        connect = {"errored": on_error, "finished": on_done or (lambda: None)}
        if on_result is not None:
            connect["returned"] = on_result
        if on_yield is not None:
            connect["yielded"] = on_yield
        return create_worker(fn, _connect=connect, _start_thread=False)
