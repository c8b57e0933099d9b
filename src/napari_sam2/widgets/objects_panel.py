"""The object panel of the dock widget: a table of objects and what can be done to them.

Only presentation: the rows come from :meth:`napari_sam2.controller.Annotator.object_table`,
and the buttons call back into the dock widget, which calls the controller.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np
from magicgui.widgets import ComboBox, Container, LineEdit, PushButton, Table

from ..controller import parse_slice_range

COLUMNS = ["object", "prompted", "filled", "shown"]


class ObjectsPanel(Container):
    """Table (colour, id, prompted slices, slices filled, shown), which objects a
    propagation runs, within which slices, and Delete / Hide for the selected rows."""

    def __init__(self, *, on_delete: Callable[[List[int]], None], on_hide: Callable[[List[int]], None],
                 on_select: Callable[[int], None]) -> None:
        super().__init__(labels=True)
        from qtpy.QtWidgets import QAbstractItemView

        self._which = ComboBox(label="Objects", choices=[("changed (or all)", "changed"), ("selected in the table", "selected")],
                               tooltip="Which objects a propagation runs: those whose prompts changed since their "
                               "last propagation (all when none did), or the objects selected in the table.")
        self._range = LineEdit(label="Slices", value="", tooltip="Propagate within first-last (e.g. 10-40); empty: all.")
        self._table = Table(label="Table")
        delete, hide = PushButton(text="Delete selected"), PushButton(text="Hide / show selected")
        self.extend([self._which, self._range, self._table, delete, hide])
        native = self._table.native
        native.setColumnCount(len(COLUMNS))
        native.setHorizontalHeaderLabels(COLUMNS)
        native.verticalHeader().setVisible(False)
        native.setMinimumHeight(160)
        native.horizontalHeader().setStretchLastSection(True)
        native.setToolTip("object: label (in its colour); prompted: slices with prompts; filled: 2D slices its "
                          "label fills; shown: drawn or hidden")
        native.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        native.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self._ids: List[int] = []  # the object of each row
        self._quiet = False
        self._on_select = on_select
        native.itemSelectionChanged.connect(self._selection_changed)
        delete.changed.connect(lambda: on_delete(self.selected))
        hide.changed.connect(lambda: on_hide(self.selected))

    @property
    def which(self) -> str:
        """"changed" or "selected": which objects a propagation runs."""
        return self._which.value

    @property
    def frame_range(self):
        """The Slices field as (first, last), None for all; raises InputError if unreadable."""
        return parse_slice_range(self._range.value)

    def configure(self, *, which: Optional[str] = None, slices: Optional[str] = None) -> None:
        if which is not None:
            self._which.value = which
        if slices is not None:
            self._range.value = str(slices)

    @property
    def selected(self) -> List[int]:
        rows = sorted({i.row() for i in self._table.native.selectedIndexes()})
        return [self._ids[r] for r in rows if r < len(self._ids)]

    def select(self, ids: Sequence[int]) -> None:
        from qtpy.QtCore import QItemSelectionModel

        table, flags = self._table.native, QItemSelectionModel.SelectionFlag
        table.clearSelection()
        for r, i in enumerate(self._ids):
            if i in set(ids):
                table.selectionModel().select(table.model().index(r, 0), flags.Select | flags.Rows)

    def _selection_changed(self) -> None:
        ids = self.selected
        if ids and not self._quiet:
            self._on_select(ids[0])

    def show_rows(self, rows, colormap=None) -> None:
        """Show the controller's rows; ``colormap`` (the labels layer's) colours the id cells."""
        from qtpy.QtGui import QColor
        from qtpy.QtWidgets import QTableWidgetItem

        keep = self.selected
        self._quiet = True
        try:
            self._ids = [r.obj_id for r in rows]
            table = self._table.native
            table.setRowCount(len(rows))
            for i, r in enumerate(rows):
                cells = [r.obj_id, ", ".join(map(str, r.prompted_slices)), r.filled_slices, "no" if r.hidden else "yes"]
                for j, v in enumerate(cells):
                    table.setItem(i, j, QTableWidgetItem(str(v)))
                if colormap is not None:
                    rgb = np.asarray(colormap.map(np.array([r.obj_id])))[0][:3]
                    self._table.native.item(i, 0).setBackground(QColor.fromRgbF(*map(float, rgb), 1.0))
            table.resizeColumnsToContents()
            self.select(keep)
        finally:
            self._quiet = False


def hiding_colormap(base, hidden: Sequence[int], labels: Sequence[int]):
    """``base`` (a labels colormap) for ``labels``, with the ``hidden`` ones transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    ids = sorted(set(labels))
    colors = dict(zip(ids, base.map(np.array(ids)))) if ids else {}
    colors.update({i: np.zeros(4) for i in hidden})
    colors[None] = np.zeros(4)
    return DirectLabelColormap(color_dict=colors)
