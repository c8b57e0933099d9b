"""The SAM 2 dock widget: click on a slice, propagate through the stack into Labels.

The widget only translates layer events into :class:`~napari_sam2.segmenter.StackSegmenter`
calls and results into the Labels layer. All model work runs in napari thread
workers; every failure becomes a napari notification.

Keys (on the widget's own layers): ``N`` new object, ``T`` toggle click polarity,
``Shift+F`` / ``Shift+B`` / ``Shift+A`` propagate forward / backward / both ways,
``Escape`` cancel a propagation, ``Ctrl+Z`` undo the last prompt change.
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
STATUS_CHARS = 240  # longer messages are cut in the status line (the whole text is its tooltip)
DOCK_MAX_WIDTH = 460
UNDO_DEPTH = 50


def _notify_error(msg: str) -> None:
    from napari.utils.notifications import show_error

    show_error(msg)


def _notify_info(msg: str) -> None:
    from napari.utils.notifications import show_info

    show_info(msg)


def _notify_warning(msg: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(msg)


def _rgba(color: str) -> np.ndarray:
    from napari.utils.colormaps.standardize_color import transform_color

    return transform_color(color)[0]


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
        self._stop_after = ComboBox(
            label="Stop an object after", choices=[("never", 0), ("1 empty slice", 1), ("2 empty slices", 2),
                                                   ("3 empty slices", 3), ("5 empty slices", 5)], value=0,
            tooltip="Stop tracking an object in a direction after this many slices where the model finds it "
            "absent (z-stacks: nuclei do not come back; time-lapses: cells may leave and return, so never).",
        )
        self._status = Label(value="Choose an image, then Start session.")
        self.extend([
            self._image_combo, self._model_combo, self._checkpoint, self._device_combo, self._fast, self._orientations,
            self._axis_combo, self._output_combo, self._start_btn, self._new_obj_btn, self._polarity_btn, self._fwd_btn,
            self._back_btn, self._both_btn, self._stop_after, self._cancel_btn, self._axes_edit, self._save_btn,
            self._status,
        ])
        # long messages wrap (and are cut) instead of widening the dock and the window
        self._status.native.setWordWrap(True)
        self.native.setMaximumWidth(DOCK_MAX_WIDTH)
        # state
        self._model = None  # a loaded SAM2Model; tests may set it directly
        self._model_key = None
        self._segmenter = None
        self._image_layer = None
        self._points = self._shapes = self._labels = None
        self._positive = True
        self._busy = None  # running worker
        self._busy_key = None
        self._pending: "dict" = {}  # request key -> (work, done, what, quiet); newer replaces older
        self._propagation = None
        self._progress = None
        self._writing = False
        self._cancelled = False
        self._sent: dict = {}  # (object, position) -> prompts last sent to the engine
        self._user_labels: set = set()  # labels in the output layer before the session: never written
        self._undo: list = []  # prompt changes, newest last
        self._layer_states: dict = {"points": None, "shapes": None}  # contents after the last handled event
        self._prop_error = None
        self._loaded_choice = None  # (model choice, checkpoint) of the model in use
        self._contrast_source = None
        # wiring
        self._model_combo.changed.connect(self._on_model_choice)
        self._fast.changed.connect(self._on_fast)
        self._orientations.changed.connect(lambda _v: self._later_setting("Orientations"))
        self._device_combo.changed.connect(lambda _v: self._later_setting("Device"))
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
        if self._segmenter is not None and value != (self._loaded_choice or (None,))[0]:
            self._set_status(f"Model {value} is used from the next Start session; the session open now keeps "
                             f"{self._loaded_choice[0]}.")

    def _later_setting(self, what: str) -> None:
        if self._segmenter is not None:
            self._set_status(f"{what} applies from the next Start session (the session open now keeps its own).")

    def _on_fast(self, value) -> None:
        seg = self._segmenter
        if seg is None:
            return
        self._run(lambda: seg.set_fast(bool(value)), lambda _r: None, what="changing fast mode", key=("fast",))
        self._set_status(f"Fast mode {'on (bfloat16)' if value else 'off (float32)'} for slices computed from now on.")

    def _on_contrast(self, event=None) -> None:
        """The model sees what the user sees: new contrast limits apply to slices computed from now on."""
        seg, layer = self._segmenter, self._contrast_source
        if seg is None or layer is None or layer.rgb:
            return
        limits = tuple(float(v) for v in layer.contrast_limits)
        if limits == tuple(seg.intensity_range or ()):
            return
        self._run(lambda: seg.set_intensity_range(limits), lambda _r: None, what="changing the contrast", key=("contrast",))
        self._set_status(f"Contrast {limits[0]:g}..{limits[1]:g}: slices computed from now on use it "
                         "(masks already made keep theirs).")

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
        text = str(text)
        short = text if len(text) <= STATUS_CHARS else text[: STATUS_CHARS - 1].rstrip() + "…"
        self._status.value = short
        self._status.tooltip = text if short != text else None

    @property
    def status(self) -> str:
        """The status line's text (cut to a few lines; the full text is in its tooltip)."""
        return self._status.value

    @property
    def status_details(self) -> str:
        """The whole last status message (what the status line's tooltip shows)."""
        return self._status.tooltip or self._status.value

    # ------------------------------------------------------------------ session

    @property
    def model_choice(self) -> str:
        """The Model list's choice (a registry name or "choose a checkpoint file…")."""
        return self._model_combo.value

    def _model_choice(self):
        name = self._model_combo.value
        ckpt = str(self._checkpoint.value) if str(self._checkpoint.value) not in ("", ".") else None
        return name, ckpt

    def _load_model(self):
        """Load (or reuse) the chosen model; raises with a plain message."""
        from ..model import load_model
        from ..model.devices import pick_device

        name, ckpt = self._model_choice()
        if name == CHOOSE_FILE:
            if not ckpt:
                raise InputError("choose a checkpoint file first")
            name = None  # the architecture the file holds
        key = (name, ckpt, self._device_combo.value)
        if self._model is not None and (self._model_key is None or self._model_key == key):
            return self._model
        device = pick_device(self._device_combo.value)
        model = load_model(name, ckpt, device=device)
        self._model, self._model_key = model, key
        return model

    def configure(self, *, image=None, model: "str | None" = None, checkpoint=None, orientations: "int | None" = None,
                  fast: "bool | None" = None, device: "str | None" = None, loaded_model=None,
                  axis: "int | None" = None, stop_after: "int | None" = None, output=None) -> None:
        """Set the widget's choices from Python (the CLI and scripts use this).

        image: an Image layer of the viewer; model: a registry name; checkpoint: a
        weights file (the model becomes "choose a checkpoint file…"); loaded_model: an
        already loaded SAM2Model to use instead of loading one; axis: the data axis to
        propagate along; stop_after: stop an object after that many empty slices (0: never;
        set it after Start session, which chooses a default for the axis); output: an existing
        Labels layer to write into (default: a new one).
        """
        if image is not None:
            self._image_combo.value = image
        if axis is not None:
            self._axis_combo.reset_choices()
            self._axis_combo.value = axis
        if checkpoint is not None:
            self._model_combo.value = CHOOSE_FILE
            self._checkpoint.value = str(checkpoint)
        elif model:
            self._model_combo.value = model
        if orientations is not None:
            self._orientations.value = orientations
        if fast is not None:
            self._fast.value = bool(fast)
        if device is not None:
            self._device_combo.value = device
        if stop_after is not None:
            self._stop_after.value = int(stop_after)
        if output is not None:
            self._output_combo.reset_choices()
            self._output_combo.value = output
        if loaded_model is not None:
            # used for the choices made so far; choosing another model later loads that one
            name, ckpt = self._model_choice()
            self._model = loaded_model
            self._model_key = (None if name == CHOOSE_FILE else name, ckpt, self._device_combo.value)

    def start(self) -> None:
        """Load the model (in a worker) and set up prompt layers for the chosen image."""
        layer = self._image_combo.value
        if layer is None:
            _notify_error("napari-sam2: choose an image layer first.")
            return
        self._set_status("Loading the model…")
        choice = self._model_choice()

        def work():
            return self._load_model()

        def done(model):
            try:
                self._begin(layer, model)
                self._loaded_choice = choice
            except InputError as err:
                _notify_error(f"napari-sam2: {err}")
                self._set_status(str(err))

        def failed(msg):
            # a model that cannot load never leaves the list showing it while the old one works
            if self._segmenter is not None and self._loaded_choice is not None:
                old, orientations = self._loaded_choice, self._orientations.value
                self._model_combo.value = old[0]
                self._checkpoint.value = old[1] or ""
                self._orientations.value = orientations
                asked = choice[1] if choice[0] == CHOOSE_FILE else choice[0]
                self._set_status(f"Could not load {asked}: {msg} Still using {old[1] or old[0]}.")
                return True
            return False

        self._run(work, done, what="loading the model", key=("load",), on_error=failed)

    def _begin(self, layer, model) -> None:
        from ..segmenter import StackSegmenter

        dims = self._viewer.dims
        nd = layer.ndim
        displayed = tuple(dims.displayed[-2:]) if dims.ndim == nd else (nd - 2, nd - 1)
        axis = self._axis_combo.value if nd > 2 else None
        if nd > 2 and dims.ndisplay != 2:
            raise InputError("switch the viewer to 2D view to give prompts")
        self.cancel()
        self._image_layer = layer
        self._sent.clear()
        self._undo.clear()
        self._segmenter = StackSegmenter(
            model, layer.data, rgb=layer.rgb, axis=axis, displayed=displayed,
            intensity_range=tuple(layer.contrast_limits) if not layer.rgb else None,
            fast=self._fast.value, corrections_as_conditioning=True, orientations=self._orientations.value,
            nonfinite="background",
        )
        if self._contrast_source is not None:
            self._contrast_source.events.contrast_limits.disconnect(self._on_contrast)
        self._contrast_source = layer
        layer.events.contrast_limits.connect(self._on_contrast)
        self._make_layers(layer)
        self._axes_edit.value = self._guess_axes(layer)
        if axis is not None:
            self._stop_after.value = 0 if self._axes_edit.value[axis:axis + 1] == "T" else 3
        self._set_status(
            f"Click on an object (positive: left click; T toggles negative). Label {self._labels.selected_label} is active."
        )
        self._prefetch()

    def _guess_axes(self, layer) -> str:
        nd = layer.ndim
        info = (getattr(layer, "metadata", None) or {}).get("napari_sam2") or {}
        axes = str(info.get("axes") or "").upper()
        if len(axes) == nd and set(axes) <= set("TZCYX"):
            return axes
        labels = [str(a).upper() for a in self._viewer.dims.axis_labels][-nd:] if self._viewer.dims.ndim == nd else []
        if labels and all(a in "TZCYX" for a in labels) and len(set(labels)) == nd:
            return "".join(labels)
        return {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TZCYX"}.get(nd, "")

    def _make_layers(self, image) -> None:
        v = self._viewer
        nd = image.ndim
        shape = image.data.shape[:-1] if image.rgb else image.data.shape
        chosen = self._output_combo.value
        meta = {"napari_sam2": dict((image.metadata or {}).get("napari_sam2") or {})}
        if chosen is not None:
            if self._labels is not None and self._labels is not chosen:
                self._labels.events.paint.disconnect(self._on_paint)
            if self._labels is not chosen:
                chosen.events.paint.connect(self._on_paint)
            self._labels = chosen  # the user's own Labels layer: their labels are never written
            self._user_labels = {int(v) for v in np.unique(np.asarray(chosen.data))} - {0}
            top = max(self._user_labels, default=0)
            self._ensure_dtype(top + 1)
            self._labels.selected_label = top + 1
            if not (self._labels.metadata or {}).get("napari_sam2"):
                self._labels.metadata = {**(self._labels.metadata or {}), **meta}
        elif self._labels is None or self._labels not in v.layers or self._labels.data.shape != tuple(shape):
            self._labels = v.add_labels(np.zeros(shape, np.uint16), name=f"{image.name} SAM2 labels", scale=image.scale[:nd],
                                        translate=image.translate[:nd], metadata=meta)
            self._user_labels = set()
            self._labels.selected_label = 1
            self._labels.events.paint.connect(self._on_paint)
        else:  # a new session in the layer of an earlier one: its objects are now the user's labels
            self._user_labels = {int(v) for v in np.unique(np.asarray(self._labels.data))} - {0}
            self._labels.selected_label = max(self._user_labels, default=0) + 1
        if self._shapes is None or self._shapes not in v.layers:
            self._shapes = v.add_shapes(ndim=nd, name=f"{image.name} SAM2 boxes", scale=image.scale[:nd], translate=image.translate[:nd],
                                        edge_color="yellow", face_color="transparent", edge_width=2,
                                        features={"object": np.zeros(0, int)})
            self._shapes.mode = "add_rectangle"
            self._shapes.events.data.connect(self._on_shapes)
        elif len(self._shapes.data):  # a new session starts without the old session's boxes
            self._quietly(lambda: setattr(self._shapes, "data", []))
        if self._points is None or self._points not in v.layers:
            self._points = v.add_points(
                ndim=nd, name=f"{image.name} SAM2 clicks", scale=image.scale[:nd], translate=image.translate[:nd],
                features={"positive": np.zeros(0, bool), "object": np.zeros(0, int)},
                face_color=POSITIVE_COLOR, size=8,
            )
            self._points.mode = "add"
            self._points.events.data.connect(self._on_points)
        elif len(self._points.data):  # ... and without its clicks (labels already made are kept)
            self._quietly(lambda: setattr(self._points, "data", np.zeros((0, nd))))
        self._layer_states = {kind: self._layer_state(kind) for kind in ("points", "shapes")}
        for layer in (self._points, self._shapes, self._labels):
            layer.bind_key("n", lambda _l: self.new_object(), overwrite=True)
            layer.bind_key("t", lambda _l: self.toggle_polarity(), overwrite=True)
            layer.bind_key("Shift-F", lambda _l: self.propagate("forward"), overwrite=True)
            layer.bind_key("Shift-B", lambda _l: self.propagate("backward"), overwrite=True)
            layer.bind_key("Shift-A", lambda _l: self.propagate("both"), overwrite=True)
            layer.bind_key("Escape", lambda _l: self.cancel(), overwrite=True)
            layer.bind_key("Control-Z", self._undo_key, overwrite=True)
        self._labels.events.selected_label.connect(self._on_selected_label)
        self._sync_defaults()
        v.layers.selection.active = self._points

    def _ensure_dtype(self, label: int) -> None:
        """Widen the output layer's dtype when ``label`` does not fit (e.g. label 256 in uint8)."""
        data = self._labels.data
        dtype = np.dtype(data.dtype)
        if np.issubdtype(dtype, np.integer) and label <= np.iinfo(dtype).max:
            return
        wider = np.uint16 if label <= np.iinfo(np.uint16).max else np.uint32
        self._labels.data = np.asarray(data).astype(wider)
        _notify_info(f"napari-sam2: the labels layer '{self._labels.name}' was {dtype}, which cannot hold label {label}; "
                     f"it is now {np.dtype(wider)} (your labels are unchanged).")

    def _on_selected_label(self, event=None) -> None:
        if self._labels is not None and int(self._labels.selected_label) in self._user_labels:
            self._set_status(f"Label {self._labels.selected_label} was in the layer before the session, so SAM 2 "
                             "never writes it: clicks now start a new object.")
        self._sync_defaults()

    def _sync_defaults(self) -> None:
        """New clicks take the active object and the current polarity (and its colour)."""
        if self._points is None:
            return
        self._points.feature_defaults = {"positive": self._positive, "object": self.active_object}
        if self._shapes is not None:
            self._shapes.feature_defaults = {"object": self.active_object}
        # napari gives the current colour to the selected points: select none first, so that
        # existing clicks keep the colour of their own polarity
        self._points.selected_data = set()
        self._points.current_face_color = POSITIVE_COLOR if self._positive else NEGATIVE_COLOR

    def _recolor_points(self) -> None:
        """Every click coloured by its own polarity."""
        pts = self._points
        if pts is None or not len(pts.data):
            return
        pos = np.asarray(pts.features["positive"], bool)
        want = np.where(pos[:, None], _rgba(POSITIVE_COLOR), _rgba(NEGATIVE_COLOR))
        if not np.allclose(pts.face_color, want):
            self._quietly(lambda: setattr(pts, "face_color", want))

    # ------------------------------------------------------------------ objects

    @property
    def active_object(self) -> int:
        return int(self._labels.selected_label) if self._labels is not None else 1

    @property
    def labels_layer(self):
        """The Labels layer results are written into (None before a session)."""
        return self._labels

    @property
    def points_layer(self):
        return self._points

    @property
    def shapes_layer(self):
        return self._shapes

    @property
    def axes(self) -> str:
        """The axis letters labels are saved with (the Axes for TIFF field)."""
        return self._axes_edit.value

    @property
    def segmenter(self):
        """The Qt-free :class:`~napari_sam2.segmenter.StackSegmenter` of the session (None before)."""
        return self._segmenter

    @property
    def session_started(self) -> bool:
        return self._segmenter is not None

    def new_object(self) -> int:
        """Start a new object with the next free label."""
        if self._labels is None:
            return 1
        used = int(self._labels.data.max()) if self._labels.data.size else 0
        used = max(used, max(self._user_labels, default=0))
        if self._points is not None and len(self._points.features):
            used = max(used, int(self._points.features["object"].max()))
        if self._shapes is not None and len(self._shapes.features):
            used = max(used, int(self._shapes.features["object"].max()))
        self._ensure_dtype(used + 1)
        self._labels.selected_label = used + 1
        self._sync_defaults()
        self._set_status(f"New object: label {used + 1}.")
        return used + 1

    def _object_for_prompt(self) -> int:
        """The active object, unless it is one of the user's own labels: then a new one."""
        obj = self.active_object
        if obj in self._user_labels or obj == 0:
            obj = self.new_object()
        return obj

    def toggle_polarity(self) -> bool:
        self._positive = not self._positive
        self._polarity_btn.text = f"Clicks: {'positive' if self._positive else 'negative'} [T]"
        self._sync_defaults()
        return self._positive

    # ------------------------------------------------------------------ prompts -> masks

    def _position(self):
        return tuple(int(round(s)) for s in self._viewer.dims.current_step[-self._image_layer.ndim:])

    def _prompt_layer(self, kind: str):
        return self._points if kind == "points" else self._shapes

    def _layer_state(self, kind: str):
        """What undo needs to put the clicks ("points") or boxes ("shapes") layer back."""
        layer = self._prompt_layer(kind)
        if layer is None:
            return None
        data = [np.array(d, copy=True) for d in layer.data] if kind == "shapes" else np.array(layer.data, copy=True)
        kinds = list(layer.shape_type) if kind == "shapes" else None
        return data, kinds, layer.features.copy()

    def _restore_layer(self, kind: str, state) -> None:
        layer = self._prompt_layer(kind)
        if layer is None or state is None:
            return
        data, kinds, feats = state
        if kind == "shapes":
            layer.data = []
            if data:
                layer.add(data, shape_type=kinds)
        else:
            layer.data = data
        layer.features = feats
        self._layer_states[kind] = state

    def _quietly(self, fn) -> None:
        """Change a layer without the change counting as a prompt."""
        self._writing = True
        try:
            fn()
        finally:
            self._writing = False

    def _on_points(self, event) -> None:
        self._on_prompt_layer("points", event)

    def _on_shapes(self, event) -> None:
        self._on_prompt_layer("shapes", event)

    def _on_prompt_layer(self, kind: str, event) -> None:
        """A click or box added, moved or deleted: re-run the objects whose prompts on this
        slice changed. A new prompt belongs to the active object (a new one if the active
        label is the user's own)."""
        action = str(getattr(event, "action", "added"))
        if self._writing or action not in ("added", "removed", "changed") or self._segmenter is None:
            return
        layer = self._prompt_layer(kind)
        before = self._layer_states[kind]
        if action == "added" and len(layer.features):
            obj = self._object_for_prompt()
            if obj != int(layer.features["object"].iloc[-1]):
                feats = layer.features.copy()
                feats.loc[feats.index[-1], "object"] = obj
                self._quietly(lambda: setattr(layer, "features", feats))
        self._layer_states[kind] = self._layer_state(kind)
        # a removed or moved prompt may belong to any object: refresh every object that
        # has (or had) prompts on this slice
        pos = self._position()
        objs = {self.active_object} | {o for (o, p) in self._sent if p == pos}
        if len(layer.data):
            objs |= {int(o) for o in layer.features["object"]}
        for obj in sorted(objs - self._user_labels):
            self._segment_current(obj, undo_layer=(kind, before))

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
        if self._shapes is not None and len(self._shapes.data):
            owners = self._shapes.features["object"]
            for data, kind, owner in zip(self._shapes.data, self._shapes.shape_type, owners):
                if int(owner) != obj_id:
                    continue
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

    @staticmethod
    def _signature(pts, labs, box):
        return (tuple(map(tuple, np.round(pts, 3))) if pts else (), tuple(labs),
                tuple(map(tuple, np.round(box, 3))) if box else None)

    def _segment_current(self, obj_id: int, *, undo_layer=None) -> None:
        seg = self._segmenter
        pos = self._position()
        pts, labs, box = self._prompts_on_slice(obj_id)
        # re-sending the same prompts is not a no-op (SAM 2 feeds its previous mask
        # back in), so only objects whose prompts on this slice changed are re-run
        signature = self._signature(pts, labs, box)
        key = (obj_id, pos)
        previous = self._sent.get(key)
        if not pts and box is None:
            if self._sent.pop(key, None) is None:
                return  # nothing was ever sent for this object here
        elif previous == signature:
            return
        else:
            self._sent[key] = signature

        def work():
            with seg.lock:
                snap = seg.snapshot(pos, obj_id)
                if box is not None:
                    return snap, True, seg.set_box(pos, obj_id, box, pts or None, labs or None)
                if pts:
                    return snap, True, seg.set_points(pos, obj_id, pts, labs)
                return snap, seg.forget_slice(pos, obj_id), None

        def done(result):
            if seg is not self._segmenter or self._labels is None:
                return  # a new session started meanwhile, or the labels layer is gone
            snap, exists, mask = result
            index = seg.label_index(pos, seg.slice_of(pos))
            entry = {"kind": "prompt", "obj": obj_id, "pos": pos, "snap": snap, "sent": previous,
                     "layer": undo_layer, "segmenter": seg}
            if not exists:  # its last prompt was deleted: the object goes, with all its labels
                entry["erased"] = self._erase_object(obj_id, seg.block_index(pos))
                self._set_status(f"Object {obj_id} had no prompt left, so it was removed with its labels.")
            else:
                entry["before"] = (index, np.array(self._labels.data[index], copy=True))
                self._write({obj_id: np.zeros(self._labels.data[index].shape, bool) if mask is None else seg.to_data_order(mask)}, index)
                if mask is not None:
                    warning = seg.small_object_warning(mask, box)
                    if warning:
                        _notify_warning(f"napari-sam2: {warning}")
                        self._set_status(warning)
            self._push_undo(entry)

        self._run(work, done, what="segmenting the slice", key=("segment", obj_id, pos))

    def _erase_object(self, obj_id: int, block: tuple):
        """Remove a session object's labels from its session's slices (``block``, e.g. one
        time point of a T-Z-Y-X movie); returns what undo needs."""
        if obj_id in self._user_labels:
            return None
        part = self._labels.data[block]
        where = np.nonzero(np.asarray(part) == obj_id)

        def erase():
            part[where] = 0
            self._labels.data[block] = part

        self._quietly(erase)
        self._labels.refresh()
        return block, where

    def _on_paint(self, event) -> None:
        """Painting with napari's brush into the Labels layer is a mask prompt."""
        if self._writing or self._segmenter is None:
            return
        obj_id = self.active_object
        if obj_id in self._user_labels:
            return  # the user's own labels are theirs to paint
        from qtpy.QtCore import QTimer

        # napari may announce a stroke before writing it: read the slice once it is written
        pos = self._position()
        QTimer.singleShot(0, lambda: self._paint_prompt(pos, obj_id))

    def _paint_prompt(self, pos, obj_id: int) -> None:
        seg = self._segmenter
        if seg is None or self._labels is None:
            return
        index = seg.label_index(pos, seg.slice_of(pos))
        mask = self._labels.data[index] == obj_id
        if seg.displayed[0] > seg.displayed[1]:
            mask = mask.T
        if not mask.any():
            return

        def work():
            with seg.lock:
                return seg.snapshot(pos, obj_id), seg.set_mask(pos, obj_id, mask)

        def done(result):
            if seg is not self._segmenter or self._labels is None:
                return
            snap, out = result
            self._push_undo({"kind": "paint", "obj": obj_id, "pos": pos, "snap": snap, "segmenter": seg,
                             "before": (index, np.array(self._labels.data[index], copy=True))})
            self._write({obj_id: seg.to_data_order(out)}, index)

        self._run(work, done, what="using the painted mask", key=("paint", obj_id, pos))

    # ------------------------------------------------------------------ undo

    def _undo_key(self, layer) -> None:
        """Ctrl+Z: on the labels layer napari's own undo, unless the last change was a stroke
        SAM 2 turned into a mask (then both go back together)."""
        painting = any(k is not None and k[0] == "paint" for k in [self._busy_key, *self._pending])
        if layer is self._labels and not painting and not (self._undo and self._undo[-1]["kind"] == "paint"):
            layer.undo()
            return
        self.undo()  # refuses while a stroke is still being turned into a mask

    def _push_undo(self, entry: dict) -> None:
        self._undo.append(entry)
        del self._undo[:-UNDO_DEPTH]

    def undo(self) -> None:
        """Undo the last prompt change (click, box, paint stroke or deleted click): the labels
        it changed, the engine's state of that object, and the layer it came from."""
        self._undo = [e for e in self._undo if e.get("segmenter") is self._segmenter]
        if self._segmenter is None or not self._undo:
            self._set_status("Nothing to undo.")
            return
        prompting = [k for k in [self._busy_key, *self._pending] if k is not None and k[0] != "prefetch"]
        if prompting:
            self._set_status("A prompt is being computed: press Ctrl+Z again when it is done.")
            _notify_info("napari-sam2: a prompt is being computed; press Ctrl+Z again when it is done.")
            return
        seg = self._segmenter
        entry = self._undo.pop()

        def work():
            seg.restore(entry["pos"], entry["obj"], entry["snap"])

        def done(_):
            def apply():
                if "before" in entry:
                    index, before = entry["before"]
                    self._labels.data[index] = before
                if entry.get("erased") is not None:
                    block, where = entry["erased"]
                    part = self._labels.data[block]
                    part[where] = entry["obj"]
                    self._labels.data[block] = part
                if entry["kind"] == "paint":
                    self._labels.undo()  # the brush stroke itself (napari's own history)
                if entry.get("layer") is not None:
                    self._restore_layer(*entry["layer"])

            self._quietly(apply)
            self._recolor_points()  # restored clicks take their own polarity's colour
            key = (entry["obj"], entry["pos"])
            if entry.get("sent") is None:
                self._sent.pop(key, None)
            else:
                self._sent[key] = entry["sent"]
            self._labels.refresh()
            self._set_status(f"Undone: the last change to object {entry['obj']}.")

        self._run(work, done, what="undoing", key=("undo", len(self._undo)))

    # ------------------------------------------------------------------ propagation

    def propagate(self, direction: str = "both") -> None:
        """Propagate all objects, each from its own prompted slices; masks appear as they come."""
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
            if not seg.has_objects(pos) and not self.is_busy:
                raise InputError("give a prompt (a click, a box or a painted mask) before propagating")
        except InputError as err:
            _notify_error(f"napari-sam2: {err}")
            return
        n = len(seg.view(pos))
        stop = self._stop_after.value or None
        self._progress = progress(total=n if direction != "both" else 2 * n, desc=f"SAM 2: propagating {direction}")
        self._cancel_btn.enabled = True

        def gen():
            yield from seg.propagate(pos, direction, stop_after_absent=stop)

        def on_yield(item):
            index, masks = item
            self._write(masks, index)
            if self._progress is not None:
                self._progress.update(1)

        def on_error(msg):
            self._prop_error = msg
            return False

        def finish(*_):
            if self._progress is not None:
                self._progress.close()
            self._progress = None
            self._propagation = None
            self._cancel_btn.enabled = False
            if self._prop_error is not None:
                self._set_status(f"Propagation stopped by an error: {self._prop_error} Slices done before it are kept.")
            elif self._cancelled:
                self._set_status("Propagation cancelled; slices done so far are kept.")
            else:
                self._clear_skipped(seg, pos)
                self._set_status("Propagation finished.")
            self._cancelled = False
            self._prop_error = None
            self._report_nonfinite()

        self._cancelled = False
        self._prop_error = None
        worker = self._make_worker(gen, on_yield=on_yield, on_done=finish, what="propagating", on_error=on_error)
        self._propagation = worker
        worker.start()

    def _clear_skipped(self, seg, pos) -> None:
        """Slices an early stop left out hold no label of that object (an earlier, longer
        propagation may have written some)."""
        if seg is not self._segmenter or self._labels is None:
            return
        by_slice: dict = {}
        for obj, indices in seg.skipped(pos).items():
            if obj in self._user_labels:
                continue
            for index in indices:
                by_slice.setdefault(repr(index), (index, set()))[1].add(obj)
        changed = False
        for index, objs in by_slice.values():
            sl = np.asarray(self._labels.data[index])
            stale = np.isin(sl, list(objs))
            if stale.any():
                sl = sl.copy()
                sl[stale] = 0
                self._quietly(lambda index=index, sl=sl: self._labels.data.__setitem__(index, sl))
                changed = True
        if changed:
            self._labels.refresh()

    def cancel(self) -> None:
        """Stop a running propagation; slices already written stay."""
        if self._propagation is not None:
            self._cancelled = True
            self._propagation.quit()

    # ------------------------------------------------------------------ saving

    def save_labels(self, path, *, overwrite: bool = False) -> Path:
        """Write the Labels layer as a TIFF with the image's axes and calibration (the Axes
        field overrides the axes); ``.tif`` is added to a name without it. Returns the path."""
        from ..io import labels_write_kwargs, write_labels

        if self._labels is None:
            raise InputError("there are no labels to save yet")
        kwargs = labels_write_kwargs(self._labels)
        typed = (self._axes_edit.value or "").upper()
        if typed:
            kwargs["axes"] = typed
        return write_labels(path, self._labels.data, overwrite=overwrite, **kwargs)

    def _save_dialog(self) -> None:
        from qtpy.QtWidgets import QFileDialog, QMessageBox

        from ..io import tiff_path

        if self._labels is None:
            _notify_error("napari-sam2: there are no labels to save yet.")
            return
        path, _ = QFileDialog.getSaveFileName(None, "Save labels", "labels.tif", "TIFF (*.tif *.tiff)")
        if not path:
            return
        # the dialog has asked about replacing the name it returned; ask only when the
        # file written is another one (".tif" added) that exists
        real = tiff_path(path)
        if str(real) != str(path) and real.exists():
            answer = QMessageBox.question(None, "Replace file?", f"{real} exists. Replace it?")
            if answer != QMessageBox.StandardButton.Yes:
                return
        self._save_to(path)

    def _save_to(self, path) -> None:
        try:
            out = self.save_labels(path, overwrite=True)
            _notify_info(f"napari-sam2: saved {out}")
            self._set_status(f"Saved {out}.")
        except Exception as err:
            _notify_error(f"napari-sam2: could not save {path}: {err}")

    # ------------------------------------------------------------------ plumbing

    def _write(self, masks, index) -> None:
        from ..segmenter import write_masks

        if self._labels is None or self._labels not in self._viewer.layers:
            return
        masks = {k: m for k, m in masks.items() if k not in self._user_labels}
        self._writing = True
        try:
            write_masks(self._labels.data, index, masks)
            self._labels.refresh()
        finally:
            self._writing = False

    def _report_nonfinite(self) -> None:
        seg = self._segmenter
        if seg is None:
            return
        news = seg.new_nonfinite_slices()
        if news:
            where = ", ".join(str(f) for _, f in news[:10]) + (" …" if len(news) > 10 else "")
            _notify_warning(f"napari-sam2: slice(s) {where} hold NaN or infinite values; they were treated as "
                            f"background (the low contrast limit). Replace them in the image to change that.")

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
            seg.prefetch(pos, [s, s + 1, s - 1])

        self._run(work, lambda _r: None, what="preparing slices", key=("prefetch",), quiet=True)

    def _run(self, work, done, *, what: str, key: tuple, quiet: bool = False, on_error=None) -> None:
        """Run ``work`` in a worker, one at a time; a queued request with the same key
        is replaced by the newer one (e.g. several quick clicks on one slice)."""
        if self._busy is not None:
            self._pending.pop(key, None)
            self._pending[key] = (work, done, what, quiet, on_error)
            return
        worker = self._make_worker(work, on_result=done, on_done=self._next, what=what, quiet=quiet, on_error=on_error)
        self._busy, self._busy_key = worker, key
        worker.start()

    def _next(self, *_):
        self._busy, self._busy_key = None, None
        self._report_nonfinite()
        if self._pending:
            key = next(iter(self._pending))
            work, done, what, quiet, on_error = self._pending.pop(key)
            self._run(work, done, what=what, key=key, quiet=quiet, on_error=on_error)

    @property
    def is_busy(self) -> bool:
        """Whether model work is running or queued."""
        return self._busy is not None or bool(self._pending) or self._propagation is not None

    def _make_worker(self, fn, *, on_result=None, on_yield=None, on_done=None, what: str, quiet=False, on_error=None):
        """on_error(message) may handle a failure itself (return True) before the usual notice."""

        def errored(err):
            msg = str(err) if isinstance(err, (InputError, ValueError, FileNotFoundError)) else f"{err.__class__.__name__}: {err}"
            handled = on_error(msg) if on_error is not None else False
            if not quiet:
                _notify_error(f"napari-sam2: {what} failed: {msg}")
                if not handled:
                    self._set_status(f"Failed while {what}: {msg}")

        from napari.qt.threading import create_worker

        connect = {"errored": errored, "finished": on_done or (lambda: None)}
        if on_result is not None:
            connect["returned"] = on_result
        if on_yield is not None:
            connect["yielded"] = on_yield
        return create_worker(fn, _connect=connect, _start_thread=False)
