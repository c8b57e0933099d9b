"""The SAM 2 dock widget: click on a slice, propagate through the stack into Labels.

The widget turns layer events and buttons into calls of the Qt-free
:class:`~napari_sam2.controller.Annotator` and refreshes the layers when it reports
a change; model work runs in napari thread workers and every failure becomes a
napari notification.

Keys (on the widget's own layers): ``N`` new object, ``T`` toggle click polarity,
``Shift+F`` / ``Shift+B`` / ``Shift+A`` propagate forward / backward / both ways,
``Escape`` cancel a propagation, ``Ctrl+Z`` undo the last change (prompt, painted
mask, propagation or deleted object).
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

from ..model.config import DEFAULT_MODEL, MODELS
from ..model.ensemble import default_orientations
from ..model.preprocess import InputError

CHOOSE_FILE = "choose a checkpoint file…"
ORIENTATION_ITEMS = [("1 (plain SAM 2)", 1), ("2", 2), ("4", 4), ("8 (most accurate)", 8)]
STOP_ITEMS = [("never", 0), ("1 empty slice", 1), ("2 empty slices", 2), ("3 empty slices", 3), ("5 empty slices", 5)]
POSITIVE_COLOR, NEGATIVE_COLOR = "#33ff33", "#ff3355"
STATUS_CHARS = 240  # longer messages are cut in the status line (the whole text is its tooltip)
DOCK_MAX_WIDTH = 460
WINDOW_DISPLAYED, WINDOW_MR = "as displayed", "MR (percentiles)"
WINDOW_CHOICES = [WINDOW_DISPLAYED, "CT soft tissue", "CT lung", "CT bone", "CT brain", WINDOW_MR]
REGION_WHOLE, REGION_VIEW, REGION_AROUND = "whole slices", "this view", "around each object"
REGION_CHOICES = [REGION_WHOLE, REGION_VIEW, REGION_AROUND]


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
        self._image_combo = ComboBox(label="Image", choices=self._image_choices, nullable=True)
        self._model_combo = ComboBox(label="Model", choices=[*MODELS, CHOOSE_FILE], value=DEFAULT_MODEL)
        self._checkpoint = FileEdit(label="Checkpoint file", mode="r", filter="*.pt *.pth", value="")
        self._checkpoint.visible = False
        self._device_combo = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._fast = CheckBox(text="Fast mode (bfloat16)", value=False)
        self._orientations = ComboBox(
            label="Orientations", choices=ORIENTATION_ITEMS, value=default_orientations(DEFAULT_MODEL),
            tooltip="Track in several rotated and mirrored views and average them: more accurate, "
            "that many times the work. Applies from the next Start session.")
        self._window_combo = ComboBox(
            label="Intensity window", choices=WINDOW_CHOICES, value=WINDOW_DISPLAYED,
            tooltip="Set the image's contrast limits to a CT window (Hounsfield units) or an MR percentile "
            "window: the model sees the image through the contrast limits.")
        self._axis_combo = ComboBox(label="Propagate along", choices=self._axis_choices)
        self._output_combo = ComboBox(label="Write into", choices=self._output_choices)
        self._start_btn = PushButton(text="Start session")
        self._new_obj_btn = PushButton(text="New object [N]")
        self._polarity_btn = PushButton(text="Clicks: positive [T]")
        self._fwd_btn = PushButton(text="Propagate ▶ [Shift+F]")
        self._back_btn = PushButton(text="◀ Propagate [Shift+B]")
        self._both_btn = PushButton(text="◀ Propagate both ▶ [Shift+A]")
        self._stop_after = ComboBox(
            label="Stop an object after", choices=STOP_ITEMS, value=0,
            tooltip="Stop tracking an object in a direction after this many slices where the model finds it "
            "absent (z-stacks: nuclei do not come back; time-lapses: cells may leave and return, so never).")
        self._auto_slice_btn = PushButton(
            text="Segment all — this slice",
            tooltip="Find every object on this slice automatically (a grid of point prompts); each becomes an "
            "object you can correct and propagate. Pixels already labelled are left alone.")
        self._auto_stack_btn = PushButton(
            text="Segment all — whole stack",
            tooltip="Find every object on this slice and every few slices, and track each both ways as far as it "
            "exists. Cancel (Esc) keeps what is done; Ctrl+Z takes the whole run back.")
        self._cancel_btn = PushButton(text="Cancel [Esc]", enabled=False)
        self._region_combo = ComboBox(
            label="Track new objects on", choices=REGION_CHOICES, value=REGION_WHOLE,
            tooltip="The model sees what it tracks resized to its input size: on a large slice small objects "
            "lose their detail. 'This view' tracks on the part of the slice now on screen (zoom in first); "
            "'around each object' on a square of the model's input size around its first prompt. Objects "
            "keep the region they were made in.")
        self._region_btn = PushButton(text="Work in this view [Shift+V]",
                                      tooltip="Track new objects on the part of the slice now on screen.")
        from .objects_panel import ObjectsPanel

        self._panel = ObjectsPanel(on_delete=lambda ids: [self.delete_object(i) for i in ids],
                                   on_hide=lambda ids: [self.set_hidden(i, i not in self.hidden_objects) for i in ids],
                                   on_select=self._select_label)
        self._undo_btn = PushButton(text="Undo [Ctrl+Z]")
        self._axes_edit = LineEdit(label="Axes for TIFF", value="")
        self._save_btn = PushButton(text="Save labels…")
        self._resume_btn = PushButton(text="Resume session…")
        self._status = Label(value="Choose an image, then Start session.")
        self.extend([
            self._image_combo, self._model_combo, self._checkpoint, self._device_combo, self._fast, self._orientations,
            self._window_combo, self._axis_combo, self._output_combo, self._start_btn, self._new_obj_btn, self._polarity_btn, self._fwd_btn,
            self._back_btn, self._both_btn, self._stop_after, self._auto_slice_btn, self._auto_stack_btn, self._cancel_btn, self._region_combo, self._region_btn, self._panel, self._undo_btn, self._axes_edit, self._save_btn, self._resume_btn,
            self._status,
        ])
        self._status.native.setWordWrap(True)  # long messages wrap instead of widening the window
        self.native.setMaximumWidth(DOCK_MAX_WIDTH)
        self._model = self._model_key = self._loaded_choice = None
        self._controller = None
        self._retired: list = []  # controllers of ended sessions whose work still runs
        self._image_layer = self._points = self._shapes = self._labels = self._region_layer = None
        self._positive = True
        self._loading = False
        self._fresh_labels = False  # the next session writes into a new labels layer (resume)
        self._writing = False  # the widget itself changes a layer: not a prompt
        self._layer_states: dict = {"points": None, "shapes": None}
        self._colormap = None  # the labels layer's own colormap, while objects are hidden
        self._model_combo.changed.connect(self._on_model_choice)
        self._device_combo.changed.connect(lambda _v: self._on_device())
        self._fast.changed.connect(self._on_fast)
        self._orientations.changed.connect(lambda _v: self._later_setting("Orientations"))
        self._start_btn.changed.connect(lambda: self.start())
        self._new_obj_btn.changed.connect(lambda: self.new_object())
        self._polarity_btn.changed.connect(lambda: self.toggle_polarity())
        self._fwd_btn.changed.connect(lambda: self.propagate("forward"))
        self._back_btn.changed.connect(lambda: self.propagate("backward"))
        self._both_btn.changed.connect(lambda: self.propagate("both"))
        self._stop_after.changed.connect(self._on_stop_after)
        self._auto_slice_btn.changed.connect(lambda: self.segment_everything(whole_stack=False))
        self._auto_stack_btn.changed.connect(lambda: self.segment_everything(whole_stack=True))
        self._cancel_btn.changed.connect(lambda: self.cancel())
        self._region_combo.changed.connect(lambda _v: self._apply_region())
        self._window_combo.changed.connect(lambda _v: self.apply_window())
        self._region_btn.changed.connect(lambda: self.work_in_view())
        self._undo_btn.changed.connect(lambda: self.undo())
        self._save_btn.changed.connect(lambda: self._save_dialog())
        self._resume_btn.changed.connect(lambda: self._resume_dialog())
        self._image_combo.changed.connect(lambda: (self._axis_combo.reset_choices(), self._output_combo.reset_choices()))
        viewer.layers.events.inserted.connect(self._refresh_choices)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        viewer.dims.events.current_step.connect(self._on_step)
        self._on_device()

    # ------------------------------------------------------------------ choices

    def _image_choices(self, _w=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _axis_choices(self, _w=None):
        layer = self._image_combo.value
        if layer is None:
            return [("none (2D)", None)]
        nd, dims = layer.ndim, self._viewer.dims
        displayed = set(dims.displayed[-2:]) if dims.ndim == nd else {nd - 2, nd - 1}
        names = dims.axis_labels if dims.ndim == nd else [str(i) for i in range(nd)]

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
        for combo in (self._image_combo, self._axis_combo, self._output_combo):
            combo.reset_choices()

    def _on_model_choice(self, value) -> None:
        self._checkpoint.visible = value == CHOOSE_FILE  # its Browse button appears only then
        self._orientations.value = default_orientations(value)
        self._on_device()
        if self._controller is not None and value != (self._loaded_choice or (None,))[0]:
            self._set_status(f"Model {value} is used from the next Start session; the session open now keeps "
                             f"{self._loaded_choice[0]}.")

    def _on_device(self) -> None:
        """Fast mode defaults to on where bfloat16 is native and pays off for the model's input size."""
        from ..model.devices import default_fast

        cfg = MODELS.get(self._model_combo.value)
        fast = cfg is not None and default_fast(cfg.image_size, self._device_combo.value)
        self._fast.tooltip = ("On by default: this hardware runs bfloat16 natively and this model's input is large "
                              "enough to gain from it." if fast else "Off by default: no native bfloat16 here, or "
                              "this model's input is too small to gain from it.")
        if self._controller is None:
            self._fast.value = fast
        else:
            self._later_setting("Device")

    def _later_setting(self, what: str) -> None:
        if self._controller is not None:
            self._set_status(f"{what} applies from the next Start session (the session open now keeps its own).")

    def _on_fast(self, value) -> None:
        if self._controller is not None:
            self._controller.set_fast(bool(value))

    def _on_stop_after(self, value) -> None:
        if self._controller is not None:
            self._controller.stop_after = int(value) or None

    def apply_window(self, choice: "str | None" = None) -> None:
        """Set the chosen image's contrast limits to an intensity window (CT presets in
        Hounsfield units, or MR percentiles of the nonzero voxels); the model sees them."""
        from ..medical import ct_window, mr_window

        if choice is not None:
            self._window_combo.value = choice  # applies it through the change signal
            return
        choice = self._window_combo.value
        layer = self._image_combo.value
        if choice == WINDOW_DISPLAYED or layer is None or layer.rgb:
            return
        try:
            lo, hi = mr_window(np.asarray(layer.data)) if choice == WINDOW_MR else ct_window(choice[3:])
        except InputError as err:
            _notify_error(f"napari-sam2: {err}")
            return
        r0, r1 = layer.contrast_limits_range
        layer.contrast_limits_range = (min(lo, r0), max(hi, r1))
        layer.contrast_limits = (lo, hi)
        self._set_status(f"Intensity window {choice}: {lo:g}..{hi:g} (the image's contrast limits).")

    def _on_contrast(self, event=None) -> None:
        """The model sees what the user sees: new contrast limits apply to slices computed from now on."""
        layer = self._image_layer
        if self._controller is not None and layer is not None and not layer.rgb:
            self._controller.set_intensity_range(layer.contrast_limits)

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        self._refresh_choices()
        if layer is self._image_layer:
            self._end_session()
            self._image_layer = None
            self._set_status("The image layer was removed; the session ended. Choose an image and Start session.")
            _notify_info("napari-sam2: the image layer was removed, so the session ended. Labels computed so far are kept.")
        for attr in ("_points", "_shapes", "_labels"):
            if getattr(self, attr) is layer:
                setattr(self, attr, None)
                if self._controller is not None:  # its prompts or labels cannot be followed any more
                    self._end_session()
                    self._set_status(f"The layer '{layer.name}' was removed, so the session ended (labels so far are "
                                     "kept). Start session again to go on.")

    def _set_status(self, text: str) -> None:
        text = str(text)
        short = text if len(text) <= STATUS_CHARS else text[: STATUS_CHARS - 1].rstrip() + "…"
        self._status.value = short
        self._status.tooltip = text if short != text else None

    # ------------------------------------------------------------------ public state

    @property
    def status(self) -> str:
        """The status line's text (cut to a few lines; the full text is in its tooltip)."""
        return self._status.value

    @property
    def status_details(self) -> str:
        """The whole last status message (what the status line's tooltip shows)."""
        return self._status.tooltip or self._status.value

    @property
    def model_choice(self) -> str:
        """The Model list's choice (a registry name or "choose a checkpoint file…")."""
        return self._model_combo.value

    @property
    def orientations(self) -> int:
        return int(self._orientations.value)

    @property
    def fast(self) -> bool:
        return bool(self._fast.value)

    @property
    def controller(self):
        """The session's Qt-free :class:`~napari_sam2.controller.Annotator` (None before Start session)."""
        return self._controller

    @property
    def segmenter(self):
        return None if self._controller is None else self._controller.segmenter

    @property
    def model(self):
        """The loaded model (None before one is loaded)."""
        return self._model

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
    def session_started(self) -> bool:
        return self._controller is not None

    @property
    def is_busy(self) -> bool:
        """Whether model work is running or queued (loading a model included)."""
        self._retired = [c for c in self._retired if c.is_busy]
        return self._loading or (self._controller is not None and self._controller.is_busy) or bool(self._retired)

    def _end_session(self) -> None:
        """Cancel the session's propagation; its running work ends on its own (labels written so far stay)."""
        if self._controller is not None:
            self._controller.cancel()
            self._retired.append(self._controller)
        self._controller = None

    @property
    def positive(self) -> bool:
        """The polarity of the next click."""
        return self._positive

    @property
    def active_object(self) -> int:
        return int(self._labels.selected_label) if self._labels is not None else 1

    @property
    def position(self) -> tuple:
        """The viewer's position in the session image's axes."""
        return tuple(round(s) for s in self._viewer.dims.current_step[-self._image_layer.ndim:])

    # ------------------------------------------------------------------ configuration and session

    def configure(self, *, image=None, model: "str | None" = None, checkpoint=None, orientations: "int | None" = None,
                  fast: "bool | None" = None, device: "str | None" = None, loaded_model=None,
                  axis: "int | None" = None, stop_after: "int | None" = None, output=None,
                  objects: "str | None" = None, slices: "str | None" = None, region: "str | None" = None) -> None:
        """Set the widget's choices from Python (the CLI, scripts and tests use this).

        image: an Image layer of the viewer; model: a registry name; checkpoint: a weights
        file (the model becomes "choose a checkpoint file…"); loaded_model: an already
        loaded SAM2Model to use for these choices; axis: the data axis to propagate along;
        stop_after: stop an object after that many empty slices (0: never; Start session
        chooses a default for the axis, so set it after); output: an existing Labels layer
        to write into (default: a new one); objects: which objects a propagation runs,
        "changed" (or all) or "selected" (in the table); slices: a range "first-last" to
        propagate within ("" for all); region: what new objects are tracked on, "whole
        slices", "this view" (the canvas now) or "around each object".
        """
        if region is not None:
            if region not in REGION_CHOICES:
                raise InputError(f"region must be one of {REGION_CHOICES}, got {region!r}")
            self._region_combo.value = region
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
        if device is not None:
            self._device_combo.value = device
        if orientations is not None:
            self._orientations.value = orientations
        if fast is not None:
            self._fast.value = bool(fast)
        if stop_after is not None:
            self._stop_after.value = int(stop_after)
        if output is not None:
            self._output_combo.reset_choices()
            self._output_combo.value = output
        self._panel.configure(which=objects, slices=slices)
        if loaded_model is not None:  # used for the choices made so far; another choice loads its own
            self._model, self._model_key = loaded_model, self._choice_key()

    def _model_choice(self):
        ckpt = str(self._checkpoint.value)
        return self._model_combo.value, (ckpt if ckpt not in ("", ".") else None)

    def _choice_key(self):
        name, ckpt = self._model_choice()
        return None if name == CHOOSE_FILE else name, ckpt, self._device_combo.value

    def _load_model(self):
        """Load (or reuse) the chosen model; raises with a plain message."""
        from ..model import load_model
        from ..model.devices import pick_device

        name, ckpt = self._model_choice()
        if name == CHOOSE_FILE and not ckpt:
            raise InputError("choose a checkpoint file first")
        key = self._choice_key()
        if self._model is not None and self._model_key == key:
            return self._model
        model = load_model(key[0], ckpt, device=pick_device(self._device_combo.value))
        self._model, self._model_key = model, key
        return model

    def start(self, then=None) -> None:
        """Load the model (in a worker) and set up prompt layers for the chosen image;
        ``then()`` runs once the session is ready."""
        from ..jobs import Job, NapariExecutor

        layer = self._image_combo.value
        if layer is None:
            _notify_error("napari-sam2: choose an image layer first.")
            return
        self._set_status("Loading the model…")
        choice = self._model_choice()

        def done(model):
            try:
                self._begin(layer, model)
                self._loaded_choice = choice
            except InputError as err:
                _notify_error(f"napari-sam2: {err}")
                self._set_status(str(err))
                return
            if then is not None:
                then()

        def failed(err):
            msg = str(err) if isinstance(err, (InputError, ValueError, FileNotFoundError)) else f"{type(err).__name__}: {err}"
            _notify_error(f"napari-sam2: loading the model failed: {msg}")
            if self._controller is not None and self._loaded_choice is not None:
                # a model that cannot load never leaves the list showing it while the old one works
                old, orientations = self._loaded_choice, self._orientations.value
                self._model_combo.value = old[0]
                self._checkpoint.value = old[1] or ""
                self._orientations.value = orientations
                asked = choice[1] if choice[0] == CHOOSE_FILE else choice[0]
                self._set_status(f"Could not load {asked}: {msg} Still using {old[1] or old[0]}.")
            else:
                self._set_status(f"Failed while loading the model: {msg}")

        self._loading = True
        NapariExecutor().run(Job(self._load_model, on_result=done, on_error=failed,
                                 on_done=lambda: setattr(self, "_loading", False)))

    def _begin(self, layer, model) -> None:
        from ..controller import Annotator
        from ..io import guess_axes
        from ..jobs import NapariExecutor

        dims = self._viewer.dims
        nd = layer.ndim
        if nd > 2 and dims.ndisplay != 2:
            raise InputError("switch the viewer to 2D view to give prompts")
        displayed = tuple(dims.displayed[-2:]) if dims.ndim == nd else (nd - 2, nd - 1)
        axis = self._axis_combo.value if nd > 2 else None
        self._end_session()
        if self._image_layer is not None:
            self._image_layer.events.contrast_limits.disconnect(self._on_contrast)
        self._image_layer = layer
        self._make_layers(layer)
        name, ckpt = self._model_choice()
        axes = self._axes_edit.value = guess_axes(layer.ndim, (layer.metadata or {}).get("napari_sam2"),
                                                 dims.axis_labels if dims.ndim == nd else ())
        if axis is not None:
            self._stop_after.value = 0 if axes[axis:axis + 1] == "T" else 3
        from ..store import store_path

        source = getattr(getattr(layer, "source", None), "path", None)
        store = store_path(source) if source and nd == 3 else None  # napari-sam2 embed's output beside the file
        self._controller = ann = Annotator(
            model, layer.data, rgb=layer.rgb, axis=axis, displayed=displayed, labels=self._labels.data,
            feature_store=store if store is not None and store.exists() else None,
            intensity_range=None if layer.rgb else tuple(layer.contrast_limits), fast=self._fast.value,
            orientations=self._orientations.value, nonfinite="background", stop_after=self._stop_after.value or None,
            executor=NapariExecutor(),
            model_info={"name": model.config.name, "checkpoint": ckpt, "choice": name, "device": self._device_combo.value})
        ann.on_labels = self._on_labels
        ann.on_status = self._set_status
        ann.on_notify = lambda level, text: {"error": _notify_error, "warning": _notify_warning}.get(level, _notify_info)(text)
        ann.on_objects = self._on_objects
        ann.on_restore = self._on_restore
        ann.ensure_fits(ann.active)
        self._labels.selected_label = ann.active
        layer.events.contrast_limits.connect(self._on_contrast)
        self._sync_defaults()
        self._on_objects()
        self._apply_region()
        self._set_status(f"Click on an object (positive: left click; T toggles negative). Label {ann.active} is active.")
        ann.prefetch(self.position)

    def _make_layers(self, image) -> None:
        v, nd = self._viewer, image.ndim
        shape = image.data.shape[:-1] if image.rgb else image.data.shape
        where = {"scale": image.scale[:nd], "translate": image.translate[:nd]}
        chosen = self._output_combo.value
        meta = {"napari_sam2": dict((image.metadata or {}).get("napari_sam2") or {})}
        if self._labels is not None and self._labels is not chosen and chosen is not None:
            self._labels.events.paint.disconnect(self._on_paint)
            self._labels = None
        if chosen is not None:  # the user's own layer: its labels are never written
            if self._labels is not chosen:
                chosen.events.paint.connect(self._on_paint)
                chosen.events.selected_label.connect(self._on_selected_label)
            self._labels = chosen
            if not (chosen.metadata or {}).get("napari_sam2"):
                chosen.metadata = {**(chosen.metadata or {}), **meta}
        elif (self._labels is None or self._labels not in v.layers or self._labels.data.shape != tuple(shape)
              or self._fresh_labels):
            self._labels = v.add_labels(np.zeros(shape, np.uint16), name=f"{image.name} SAM2 labels", metadata=meta, **where)
            self._labels.events.paint.connect(self._on_paint)
            self._labels.events.selected_label.connect(self._on_selected_label)
        self._fresh_labels = False
        # (a new session in an earlier session's layer: its objects are now the user's labels)
        if self._shapes is None or self._shapes not in v.layers:
            self._shapes = v.add_shapes(ndim=nd, name=f"{image.name} SAM2 boxes", edge_color="yellow",
                                        face_color="transparent", edge_width=2, features={"object": np.zeros(0, int)}, **where)
            self._shapes.mode = "add_rectangle"
            self._shapes.events.data.connect(lambda e: self._on_prompt_layer("shapes", e))
        elif len(self._shapes.data):  # a new session starts without the old session's boxes
            self._quietly(lambda: setattr(self._shapes, "data", []))
        if self._points is None or self._points not in v.layers:
            self._points = v.add_points(ndim=nd, name=f"{image.name} SAM2 clicks", face_color=POSITIVE_COLOR, size=8,
                                        features={"positive": np.zeros(0, bool), "object": np.zeros(0, int)}, **where)
            self._points.mode = "add"
            self._points.events.data.connect(lambda e: self._on_prompt_layer("points", e))
        elif len(self._points.data):  # ... and without its clicks (labels already made are kept)
            self._quietly(lambda: setattr(self._points, "data", np.zeros((0, nd))))
        self._layer_states = {kind: self._layer_state(kind) for kind in ("points", "shapes")}
        for layer in (self._points, self._shapes, self._labels):
            for key, action in (("n", self.new_object), ("t", self.toggle_polarity), ("Escape", self.cancel),
                                ("Shift-F", lambda: self.propagate("forward")), ("Shift-B", lambda: self.propagate("backward")),
                                ("Shift-A", lambda: self.propagate("both")), ("Shift-V", self.work_in_view)):
                layer.bind_key(key, lambda _l, action=action: action(), overwrite=True)
            layer.bind_key("Control-Z", self._undo_key, overwrite=True)
        v.layers.selection.active = self._points

    # ------------------------------------------------------------------ objects

    def _on_labels(self, replaced: bool) -> None:
        if self._labels is None or self._labels not in self._viewer.layers:
            return
        if replaced:
            self._quietly(lambda: setattr(self._labels, "data", self._controller.labels))
        self._labels.refresh()

    def _on_selected_label(self, event=None) -> None:
        if self._controller is not None and self._labels is not None:
            self._controller.select(int(self._labels.selected_label))
        self._sync_defaults()

    def _sync_defaults(self) -> None:
        """New clicks take the active object and the current polarity (and its colour)."""
        if self._points is None:
            return
        self._points.feature_defaults = {"positive": self._positive, "object": self.active_object}
        if self._shapes is not None:
            self._shapes.feature_defaults = {"object": self.active_object}
        # napari gives the current colour to the selected points: select none first
        self._points.selected_data = set()
        self._points.current_face_color = POSITIVE_COLOR if self._positive else NEGATIVE_COLOR

    def new_object(self) -> int:
        """Start a new object with the next free label."""
        if self._controller is None:
            return 1
        label = self._controller.new_object()
        self._labels.selected_label = label
        self._sync_defaults()
        return label

    def toggle_polarity(self) -> bool:
        self._positive = not self._positive
        self._polarity_btn.text = f"Clicks: {'positive' if self._positive else 'negative'} [T]"
        self._sync_defaults()
        return self._positive

    @property
    def object_rows(self):
        """The object table's rows (:class:`~napari_sam2.controller.ObjectRow`)."""
        return [] if self._controller is None else self._controller.object_table()

    @property
    def selected_objects(self) -> list:
        """Objects selected in the table (the active object when none is)."""
        ann = self._controller
        return self._panel.selected or ([self.active_object] if ann is not None and self.active_object in ann.objects else [])

    def select_objects(self, ids) -> None:
        """Select objects in the table (the first becomes the active object)."""
        self._panel.select(ids)

    def _select_label(self, obj_id: int) -> None:
        if self._labels is not None:
            self._labels.selected_label = obj_id

    @property
    def hidden_objects(self) -> list:
        return [] if self._controller is None else self._controller.hidden

    def _on_objects(self) -> None:
        """The object table and the hidden objects follow the controller."""
        from .objects_panel import hiding_colormap

        layer = self._labels
        self._panel.show_rows(self.object_rows, None if layer is None else (self._colormap or layer.colormap))
        hidden = self.hidden_objects
        if layer is None or not (hidden or self._colormap):
            return
        self._colormap = self._colormap or layer.colormap
        shown = set(self._controller.objects) | set(self._controller.user_labels)
        layer.colormap = hiding_colormap(self._colormap, hidden, shown) if hidden else self._colormap
        if not hidden:
            self._colormap = None

    def delete_object(self, obj_id: int) -> None:
        """Remove an object: its labels, its clicks and boxes, its engine state (Ctrl+Z brings it back)."""
        if self._controller is None:
            return
        tag = ("layers", {k: self._layer_state(k) for k in ("points", "shapes")})
        for kind in ("points", "shapes"):
            layer = self._prompt_layer(kind)
            if layer is not None and len(layer.data):
                keep = np.asarray(layer.features["object"]) != obj_id
                if not keep.all():
                    self._quietly(lambda layer=layer, keep=keep: self._keep_rows(layer, keep))
                    self._layer_states[kind] = self._layer_state(kind)
        self._controller.delete_object(obj_id, tag=tag)

    def _keep_rows(self, layer, keep) -> None:
        layer.selected_data = set(np.flatnonzero(~keep).tolist())
        layer.remove_selected()

    def set_hidden(self, obj_id: int, hidden: bool = True) -> None:
        if self._controller is not None:
            self._controller.set_hidden(obj_id, hidden)

    # ------------------------------------------------------------------ prompts

    def _prompt_layer(self, kind: str):
        return self._points if kind == "points" else self._shapes

    def _layer_state(self, kind: str):
        """What undo needs to put the clicks ("points") or boxes ("shapes") layer back."""
        layer = self._prompt_layer(kind)
        if layer is None:
            return None
        data = [np.array(d, copy=True) for d in layer.data] if kind == "shapes" else np.array(layer.data, copy=True)
        return data, list(layer.shape_type) if kind == "shapes" else None, layer.features.copy()

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

    def _on_prompt_layer(self, kind: str, event) -> None:
        """A click or box added, moved or deleted: the controller re-runs the objects whose
        prompts on this slice changed. A new prompt belongs to the active object (a new one
        if the active label is the user's own)."""
        ann = self._controller
        if self._writing or ann is None or str(getattr(event, "action", "added")) not in ("added", "removed", "changed"):
            return
        layer = self._prompt_layer(kind)
        before = self._layer_states[kind]
        if str(getattr(event, "action", "added")) == "added" and len(layer.features):
            obj = ann.object_for_prompt()
            if obj != self.active_object:
                self._labels.selected_label = obj
            if obj != int(layer.features["object"].iloc[-1]):
                feats = layer.features.copy()
                feats.loc[feats.index[-1], "object"] = obj
                self._quietly(lambda: setattr(layer, "features", feats))
        self._layer_states[kind] = self._layer_state(kind)
        pts, shp = self._points, self._shapes
        clicks = zip(pts.data, pts.features["positive"], pts.features["object"]) if pts is not None and len(pts.data) else ()
        boxes = [(d, o) for d, t, o in zip(shp.data, shp.shape_type, shp.features["object"]) if t == "rectangle"] \
            if shp is not None and len(shp.data) else []
        ann.sync_slice(self.position, clicks, boxes, tag=("layer", kind, before))

    def _on_paint(self, event) -> None:
        """Painting with napari's brush into the Labels layer is a mask prompt."""
        if self._writing or self._controller is None or self.active_object in self._controller.user_labels:
            return
        from qtpy.QtCore import QTimer

        # napari may announce a stroke before writing it: read the slice once it is written
        pos, obj = self.position, self.active_object
        QTimer.singleShot(0, lambda: self._controller is not None and self._controller.paint(pos, obj, tag=("stroke",)))

    def _on_restore(self, tag) -> None:
        """Undo put back a change: put back the layer it came from too."""
        if tag[0] == "stroke" and self._labels is not None:
            self._quietly(self._labels.undo)  # the brush stroke itself (napari's own history)
        elif tag[0] == "layer":
            self._quietly(lambda: self._restore_layer(tag[1], tag[2]))
        elif tag[0] == "layers":
            self._quietly(lambda: [self._restore_layer(k, s) for k, s in tag[1].items()])
        self._recolor_points()

    def _recolor_points(self) -> None:
        """Each click in its own polarity's colour (after the layer was put back or refilled)."""
        if self._points is not None and len(self._points.data):
            pos = np.asarray(self._points.features["positive"], bool)
            want = np.where(pos[:, None], _rgba(POSITIVE_COLOR), _rgba(NEGATIVE_COLOR))
            self._quietly(lambda: setattr(self._points, "face_color", want))

    # ------------------------------------------------------------------ undo and propagation

    def _undo_key(self, layer) -> None:
        """Ctrl+Z: on the labels layer napari's own undo, unless the last change was SAM 2's."""
        ann = self._controller
        painting = ann is not None and any(k[0] == "paint" for k in ann.queue.keys)
        if layer is self._labels and not painting and (ann is None or ann.last_change not in ("paint",)):
            layer.undo()
            return
        self.undo()

    def undo(self) -> None:
        """Undo the last change: a prompt (click, box, painted mask, deleted click), a
        propagation or a deleted object — labels, engine state and prompt layers."""
        if self._controller is None:
            self._set_status("Nothing to undo.")
            return
        self._controller.undo()

    def propagate(self, direction: str = "both") -> None:
        """Propagate objects, each from its own prompted slices; masks appear as they come.
        The Objects and Slices fields say which objects and how far."""
        from napari.utils import progress

        ann = self._controller
        if ann is None:
            _notify_error("napari-sam2: start a session and give a prompt first.")
            return
        try:
            frame_range = self._panel.frame_range
        except InputError as err:
            _notify_error(f"napari-sam2: {err}")
            self._set_status(str(err))
            return
        objects = self.selected_objects if self._panel.which == "selected" else None
        n = len(ann.segmenter.view(self.position)) if ann.axis is not None else 0
        bar = progress(total=n if direction != "both" else 2 * n, desc=f"SAM 2: propagating {direction}")

        def finish(_completed=True):
            bar.close()
            self._cancel_btn.enabled = False

        if ann.propagate(self.position, direction, objects=objects, frame_range=frame_range,
                         on_slice=lambda: bar.update(1), on_end=finish):
            self._cancel_btn.enabled = True
        else:
            bar.close()

    def segment_everything(self, whole_stack: bool = False, **params) -> None:
        """Find every object automatically on this slice (``whole_stack=False``) or through the
        stack, tracked both ways; every object found is an ordinary object afterwards.
        params: see :meth:`napari_sam2.controller.Annotator.segment_everything`."""
        from napari.utils import progress

        ann = self._controller
        if ann is None:
            _notify_error("napari-sam2: start a session first (Start session).")
            return
        bar = progress(total=1, desc="SAM 2: segment everything" + (" (whole stack)" if whole_stack else ""))
        seen = {"n": 0}

        def step(searched: int, total: int) -> None:
            bar.total = total
            if searched > seen["n"]:
                bar.update(searched - seen["n"])
                seen["n"] = searched

        def finish(_completed=True):
            bar.close()
            self._cancel_btn.enabled = False

        if ann.segment_everything(self.position, whole_stack=whole_stack, on_progress=step, on_end=finish, **params):
            self._cancel_btn.enabled = True
        else:
            bar.close()

    def cancel(self) -> None:
        """Stop a running propagation; slices already written stay."""
        if self._controller is not None:
            self._controller.cancel()

    # ------------------------------------------------------------------ regions of interest

    @property
    def region(self):
        """Where new objects are tracked: a :class:`~napari_sam2.model.roi.Roi` (this view),
        "auto" (around each object) or None (whole slices)."""
        return None if self._controller is None else self._controller.roi

    def _view_region(self):
        """The part of the image's slice now on the canvas, as a Roi (rows, columns of the displayed axes)."""
        from ..model.roi import Roi

        layer = self._image_layer
        seg = self.segmenter
        corners = np.asarray(layer.corner_pixels, float)[:, list(seg.displayed)]  # [min, max] data pixels
        return Roi.from_corners(corners, seg.slice_shape)

    def work_in_view(self) -> None:
        """Track new objects on the part of the slice now on screen (zoom in on the objects first)."""
        if self._region_combo.value == REGION_VIEW:
            self._apply_region()
        else:
            self._region_combo.value = REGION_VIEW  # applies it

    def _apply_region(self) -> None:
        ann = self._controller
        if ann is None:
            return
        choice = self._region_combo.value
        try:
            if choice == REGION_VIEW:
                region = ann.set_roi(self._view_region())
            else:
                region = ann.set_roi("auto" if choice == REGION_AROUND else None)
        except InputError as err:
            _notify_error(f"napari-sam2: {err}")
            self._set_status(str(err))
            return
        self._show_region(region)

    def _show_region(self, region) -> None:
        """Outline the region on every slice (a 2D shapes layer over the displayed axes)."""
        v = self._viewer
        if region is None:
            if self._region_layer is not None and self._region_layer in v.layers:
                v.layers.remove(self._region_layer)
            self._region_layer = None
            return
        layer = self._image_layer
        disp = list(self.segmenter.displayed)
        rect = np.array([[region.top - 0.5, region.left - 0.5], [region.bottom - 0.5, region.right - 0.5]])
        if self._region_layer is None or self._region_layer not in v.layers:
            self._region_layer = v.add_shapes(
                [rect], shape_type="rectangle", name=f"{layer.name} SAM2 region", edge_color="cyan",
                face_color="transparent", edge_width=2, scale=np.asarray(layer.scale)[disp],
                translate=np.asarray(layer.translate)[disp])
            self._region_layer.editable = False
        else:
            self._region_layer.data = [rect]
        v.layers.selection.active = self._points

    # ------------------------------------------------------------------ saving and resuming

    def save_labels(self, path, *, overwrite: bool = False, session: bool = True) -> Path:
        """Write the Labels layer as a TIFF with the image's axes and calibration (the Axes
        field overrides the axes; ``.tif`` is added to a bare name), or as NIfTI for a
        ``.nii`` / ``.nii.gz`` name (with the geometry of the NIfTI volume the labels were
        made on) and, with ``session``,
        the session beside it (``NAME.sam2.json``: objects, prompts, settings). Returns the
        written file's path."""
        from ..controller import session_path
        from ..io import labels_write_kwargs, write_labels
        from ..medical import is_nifti, write_labels_layer

        if self._labels is None:
            raise InputError("there are no labels to save yet")
        kwargs = labels_write_kwargs(self._labels)
        typed = (self._axes_edit.value or "").upper()
        if typed:
            kwargs["axes"] = typed
        if is_nifti(path):  # with the geometry of the NIfTI volume the labels were made on
            if Path(path).exists() and not overwrite:
                raise FileExistsError(f"{path} exists; choose another name or allow replacing it")
            source = ((self._labels.metadata or {}).get("napari_sam2") or {}).get("nifti_source")
            if not source or not Path(source).exists():
                _notify_warning("napari-sam2: the image was not opened from a NIfTI file that still exists, so the "
                                "labels are saved with an identity affine (1 mm voxels, no orientation).")
            out = Path(write_labels_layer(str(path), self._labels.data, {"metadata": self._labels.metadata})[0])
            kwargs.pop("axes", None)
        else:
            out = write_labels(path, self._labels.data, overwrite=overwrite, **kwargs)
        if session and self._controller is not None:
            self._controller.save(session_path(out), labels_file=out.name, labels_axes=kwargs.get("axes"),
                                  image_name=self._image_layer.name)
        return out

    def resume(self, path, *, propagate: bool = False) -> None:
        """Open a saved session (``NAME.sam2.json``) on the chosen image: the model and
        settings it was made with, its objects and prompts, and its labels (from the TIFF
        beside it; without that file, or with ``propagate``, its propagations run again)."""
        from ..controller import load_session
        from ..io import read_labels

        record = load_session(path)
        info, settings = record.get("model") or {}, record.get("settings") or {}
        if info.get("checkpoint") and Path(info["checkpoint"]).exists() and info.get("choice") == CHOOSE_FILE:
            self.configure(checkpoint=info["checkpoint"])
        elif (self._model is not None and self._model.config.name == info.get("name")
              and (info.get("checkpoint") or None) == (self._model_key or (None, None))[1]):
            self.configure(model=info["name"] if info["name"] in MODELS else None, loaded_model=self._model)
        elif info.get("name") in MODELS:
            self.configure(model=info["name"])
        self.configure(orientations=settings.get("orientations"), fast=settings.get("fast"),
                       axis=(record.get("view") or {}).get("axis"))
        labels_file = record.get("labels_file")
        labels_path = Path(path).parent / labels_file if labels_file else None
        saved = None
        if labels_path is not None and labels_path.exists():
            saved = read_labels(labels_path, record.get("labels_axes"), (record.get("image") or {}).get("shape") or ())
        limits = settings.get("intensity_range")
        layer = self._image_combo.value
        if limits and layer is not None and not layer.rgb:  # the model sees what it saw then
            layer.contrast_limits = limits
        self._fresh_labels = True  # never the layer of an earlier session

        def then():
            ann = self._controller
            try:
                ann.resume(record, labels=saved, propagate=propagate or saved is None)
            except (InputError, OSError) as err:
                _notify_error(f"napari-sam2: {err}")
                self._set_status(str(err))
                return
            self._stop_after.value = int(settings.get("stop_after") or 0)
            clicks, boxes = ann.prompt_items()  # the prompts, as clicks and boxes a user can edit
            nd = self._image_layer.ndim
            feats = {"positive": np.array([c[1] for c in clicks], bool), "object": np.array([c[2] for c in clicks], int)}
            self._quietly(lambda: (setattr(self._points, "data", np.array([c[0] for c in clicks], float).reshape(-1, nd)),
                                   setattr(self._points, "features", feats)))
            if boxes:
                self._quietly(lambda: (self._shapes.add_rectangles([np.array(b[0], float) for b in boxes]),
                                       setattr(self._shapes, "features", {"object": np.array([b[1] for b in boxes], int)})))
            self._layer_states = {kind: self._layer_state(kind) for kind in ("points", "shapes")}
            self._recolor_points()
            self._labels.selected_label = ann.active
            self._set_status(f"Resumed {Path(path).name}: {len(ann.objects)} objects.")

        self.start(then=then)

    def _save_dialog(self) -> None:
        from qtpy.QtWidgets import QFileDialog, QMessageBox

        from ..io import tiff_path

        if self._labels is None:
            _notify_error("napari-sam2: there are no labels to save yet.")
            return
        path, _ = QFileDialog.getSaveFileName(None, "Save labels", "labels.tif",
                                              "TIFF (*.tif *.tiff);;NIfTI (*.nii.gz *.nii)")
        if not path:
            return
        # the dialog asked about replacing the name it returned; ask only when another file (".tif" added) exists
        real = Path(path) if str(path).lower().endswith((".nii", ".nii.gz")) else tiff_path(path)
        if str(real) != str(path) and real.exists() and QMessageBox.question(
                None, "Replace file?", f"{real} exists. Replace it?") != QMessageBox.StandardButton.Yes:
            return
        try:
            out = self.save_labels(path, overwrite=True)
            _notify_info(f"napari-sam2: saved {out} and the session beside it")
            self._set_status(f"Saved {out} (and {out.stem}.sam2.json: objects, prompts and settings).")
        except Exception as err:  # noqa: BLE001 - whatever failed, the user is told and keeps working
            _notify_error(f"napari-sam2: could not save {path}: {err}")

    def _resume_dialog(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(None, "Resume a session", "", "napari-sam2 session (*.sam2.json *.json)")
        if path:
            try:
                self.resume(path)
            except (InputError, OSError) as err:
                _notify_error(f"napari-sam2: {err}")
                self._set_status(str(err))

    # ------------------------------------------------------------------ prefetch

    def _on_step(self, event=None) -> None:
        if self._controller is not None and self._image_layer is not None:
            self._controller.prefetch(self.position)
