"""The Qt-free annotation controller: prompts, numbering, deletion, undo, views, 4D, save/resume.

Expectations come from outside the controller: a plain engine session given the same
prompts, hand-made labels and coordinates, copies taken before a change, and a round
trip through the saved file. Work runs synchronously (the default executor).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from _stacks import paint_by_hand, two_blob_volume

from napari_sam2.controller import (
    Annotator,
    decode_mask,
    encode_mask,
    load_session,
    session_path,
)
from napari_sam2.jobs import SyncExecutor
from napari_sam2.model.ensemble import open_session
from napari_sam2.model.frames import FrameSource
from napari_sam2.model.preprocess import InputError

volume = two_blob_volume



LIMITS = (900.0, 2700.0)


def annotator(model, data, **kw):
    kw.setdefault("axis", 0)
    kw.setdefault("displayed", (1, 2))
    return Annotator(model, data, intensity_range=LIMITS, **kw)


def engine(model, data):
    """An independent session on the same data and intensity mapping."""
    return open_session(model, FrameSource(np.asarray(data), LIMITS), corrections_as_conditioning=True)


def test_importing_the_controller_loads_no_qt():
    code = ("import sys, napari_sam2.controller; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_click_writes_the_engines_mask_and_a_propagation_its_tracks(model):
    data = volume()
    ann = annotator(model, data)
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1)])
    ann.new_object()
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1), ((3, 30, 43), True, 2)])
    ref = engine(model, data)
    expected = np.zeros(data.shape, np.uint16)
    paint_by_hand(expected, (3,), {1: ref.add_points(3, 1, points=[[20, 21]], labels=[1])[1]})
    paint_by_hand(expected, (3,), {2: ref.add_points(3, 2, points=[[43, 30]], labels=[1])[2]})
    np.testing.assert_array_equal(ann.labels, expected)
    assert ann.propagate((3, 0, 0), "both")
    for z, masks in ref.propagate("both"):
        paint_by_hand(expected, (z,), masks)
    np.testing.assert_array_equal(ann.labels, expected)
    assert {1, 2} <= set(np.unique(ann.labels))


def test_the_same_prompts_again_are_not_recomputed(model):
    ann = annotator(model, volume())
    assert ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1)]) == [1]
    assert ann.sync_slice((3, 5, 7), clicks=[((3, 21, 20), True, 1)]) == []  # same slice, same click
    assert ann.sync_slice((4, 0, 0), clicks=[((3, 21, 20), True, 1)]) == []  # the click is not on slice 4


def test_a_transposed_view_matches_the_engine_on_the_transposed_stack(model):
    data = volume()
    # the viewer shows axis 2 as rows and axis 1 as columns: a click at row 20, column 21
    ann = annotator(model, data, displayed=(2, 1))
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1)])
    view = np.swapaxes(data, 1, 2)  # by hand: what the viewer shows
    want = engine(model, view).add_points(3, 1, points=[[21, 20]], labels=[1])[1]  # (x=col, y=row)
    assert want.any()
    np.testing.assert_array_equal(ann.labels[3] == 1, want.T)


def test_a_box_from_a_rectangles_four_corners(model):
    data = volume()
    ann = annotator(model, data)
    corners = np.array([[3, 10, 12], [3, 10, 29], [3, 27, 29], [3, 27, 12]], float)
    ann.sync_slice((3, 0, 0), boxes=[(corners, 1)])
    want = engine(model, data).add_points(3, 1, box=[12, 10, 29, 27])[1]
    np.testing.assert_array_equal(ann.labels[3] == 1, want)


def test_numbering_starts_above_the_users_labels_which_are_never_written(model):
    data = volume()
    labels = np.zeros(data.shape, np.uint8)
    labels[3, 15:22, 15:25] = 5  # the user's own label, under the object about to be clicked
    labels[0, :2, :2] = 255
    before = labels.copy()
    notes = []
    ann = annotator(model, data, labels=labels)
    ann.on_notify = lambda level, text: notes.append((level, text))
    assert ann.active == 256
    ann.select(5)  # a user's label is active: a prompt starts a new object
    assert ann.object_for_prompt() == 256
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 256)])
    assert ann.labels.dtype == np.uint16  # widened to hold 256
    assert any("uint16" in t for _, t in notes)
    user = before > 0
    np.testing.assert_array_equal(ann.labels[user], before[user])
    assert (ann.labels == 256).any()
    assert ann.next_label() == 257


def test_delete_an_object_and_undo_the_deletion(model):
    data = volume()
    ann = annotator(model, data)
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1), ((3, 30, 43), True, 2)])
    ann.propagate((3, 0, 0), "both")
    both = ann.labels.copy()
    ann.delete_object(1)
    assert not (ann.labels == 1).any()
    np.testing.assert_array_equal(ann.labels == 2, both == 2)
    assert [r.obj_id for r in ann.object_table()] == [2]
    ann.undo()
    np.testing.assert_array_equal(ann.labels, both)
    assert [r.obj_id for r in ann.object_table()] == [1, 2]
    # the engine has object 1 back too: propagating it alone again gives what a plain
    # session gives after the same steps
    ann.propagate((3, 0, 0), "both", objects=[1])
    ref = engine(model, data)
    ref.add_points(3, 1, points=[[20, 21]], labels=[1])
    ref.add_points(3, 2, points=[[43, 30]], labels=[1])
    for _ in ref.propagate("both"):
        pass
    again = {z: m[1] for z, m in ref.propagate("both", obj_ids=[1])}
    for z, m in again.items():
        free = ann.labels[z] != 2  # object 2's pixels stay object 2's
        np.testing.assert_array_equal((ann.labels[z] == 1)[free], m[free])


def test_undo_a_prompt_then_a_propagation(model):
    data = volume()
    ann = annotator(model, data)
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1)])
    one_click = ann.labels.copy()
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1), ((3, 14, 14), False, 1)])
    assert ann.undo() == "prompt"
    np.testing.assert_array_equal(ann.labels, one_click)
    assert ann.prompts_on_slice((3, 0, 0))[1].labels == (1,)
    ann.propagate((3, 0, 0), "forward")
    forward = ann.labels.copy()
    assert forward[4:].any()
    assert ann.undo() == "propagation"
    np.testing.assert_array_equal(ann.labels, one_click)
    ann.propagate((3, 0, 0), "forward")  # the engine's memories were put back too
    np.testing.assert_array_equal(ann.labels, forward)
    assert ann.undo() == "propagation"
    assert ann.undo() == "prompt"  # the first click: the object goes
    assert not ann.labels.any() and ann.object_table() == []


def test_a_correction_reruns_only_the_corrected_object(model):
    data = volume()
    ann = annotator(model, data)
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1), ((3, 30, 43), True, 2)])
    ann.propagate((3, 0, 0), "both")
    first = ann.labels.copy()
    ann.sync_slice((6, 0, 0), clicks=[((6, 30, 46), True, 2), ((6, 30, 36), False, 2)])
    ann.propagate((6, 0, 0), "both")
    assert ann.history[-1]["objects"] == [2]
    np.testing.assert_array_equal(ann.labels == 1, first == 1)  # object 1 untouched
    # object 2 alone in a plain session, through the same steps
    ref = engine(model, data)
    want = np.zeros(data.shape, bool)
    want[3] = ref.add_points(3, 2, points=[[43, 30]], labels=[1])[2]
    for z, masks in ref.propagate("both"):
        want[z] = masks[2]
    want[6] = ref.add_points(6, 2, points=[[46, 30], [36, 30]], labels=[1, 0])[2]
    for z, masks in ref.propagate("both"):
        want[z] = masks[2]
    got = ann.labels == 2
    # where object 1 is drawn over object 2 (overlaps keep the other object's pixels), skip
    free = ~(ann.labels == 1)
    np.testing.assert_array_equal(got[free], want[free])


def test_propagation_within_a_range_and_for_selected_objects(model):
    data = volume()
    ann = annotator(model, data)
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1), ((3, 30, 43), True, 2)])
    ann.propagate((3, 0, 0), "both", objects=[2], frame_range=(2, 5))
    filled = {z for z in range(8) if (ann.labels[z] == 2).any()}
    assert filled <= {2, 3, 4, 5} and filled > {3}
    assert {z for z in range(8) if (ann.labels[z] == 1).any()} == {3}
    rows = {r.obj_id: r for r in ann.object_table()}
    assert rows[1].prompted_slices == [3] and rows[1].filled_slices == 1
    assert rows[2].filled_slices == len(filled)


def test_cancel_keeps_the_slices_done(model):
    data = volume(n=10)
    ann = annotator(model, data)
    ann.sync_slice((0, 0, 0), clicks=[((0, 18, 20), True, 1)])
    writes = []

    def on_labels(_replaced):
        writes.append(1)
        if len(writes) == 3:
            ann.cancel()

    ann.on_labels = on_labels
    ann.propagate((0, 0, 0), "forward")
    done = [z for z in range(10) if ann.labels[z].any()]
    assert done == [0, 1, 2]
    assert "cancelled" in ann.status


def test_4d_positions_and_the_session_bound(model):
    data = np.stack([volume(n=4, seed=s) for s in range(6)])  # T Z Y X
    ann = annotator(model, data, axis=1, displayed=(2, 3))
    ann.sync_slice((1, 2, 0, 0), clicks=[((1, 2, 21, 20), True, 1)])
    ann.propagate((1, 2, 0, 0), "both")
    assert ann.labels[1].any()
    assert not np.delete(ann.labels, 1, axis=0).any()
    want = engine(model, data[1]).add_points(2, 1, points=[[20, 21]], labels=[1])[1]
    np.testing.assert_array_equal(ann.labels[1, 2] == 1, want)
    for t in range(6):  # scrolling T with prefetch
        ann.prefetch((t, 0, 0, 0))
    sessions = ann.segmenter.sessions
    assert len(sessions) <= ann.segmenter.keep_sessions + 1  # the one holding the object is kept


def test_painted_mask_is_a_mask_prompt(model):
    data = volume()
    ann = annotator(model, data)
    ann.active = 1
    ann.labels[3, 14:23, 15:26] = 1  # "painted" with napari's brush
    painted = ann.labels[3] == 1
    assert ann.paint((3, 0, 0))
    want = engine(model, data).add_mask(3, 1, painted)[1]
    np.testing.assert_array_equal(ann.labels[3] == 1, want)


def test_mask_run_lengths_by_hand():
    m = np.array([[1, 1, 0], [0, 1, 1]], bool)
    assert encode_mask(m) == {"shape": [2, 3], "runs": [0, 2, 2, 2]}
    assert encode_mask(~m)["runs"] == [2, 2, 2]
    np.testing.assert_array_equal(decode_mask({"shape": [2, 3], "runs": [0, 2, 2, 2]}), m)
    with pytest.raises(InputError, match="pixels"):
        decode_mask({"shape": [2, 3], "runs": [1, 2]})


def test_save_and_resume_round_trip(model, tmp_path):
    data = volume()
    ann = annotator(model, data, stop_after=2, model_info={"name": "test-tiny", "checkpoint": None})
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1)])
    corners = np.array([[5, 22, 32], [5, 38, 50]], float)
    ann.sync_slice((5, 0, 0), boxes=[(corners, 2)])
    ann.labels[1, 14:20, 16:24] = 3
    ann.paint((1, 0, 0), 3)
    ann.set_hidden(2, True)
    ann.propagate((3, 0, 0), "both")
    path = ann.save(session_path(tmp_path / "out" / "labels.tif"), labels_file="labels.tif")
    assert path.name == "labels.sam2.json"
    record = load_session(path)
    assert record["model"]["name"] == "test-tiny"
    assert record["settings"]["intensity_range"] == list(LIMITS)
    assert record["settings"]["stop_after"] == 2
    box = next(p for o in record["objects"] if o["id"] == 2 for p in o["prompts"])
    assert box["box"] == [[5, 22, 32], [5, 38, 50]]  # data coordinates, as given
    assert json.loads(path.read_text())["objects"][0]["prompts"][0]["points"] == [[3, 21, 20]]

    again = annotator(model, data, stop_after=2)
    again.resume(path, propagate=True)
    np.testing.assert_array_equal(again.labels, ann.labels)
    assert again.hidden == [2]
    mine = again.session_record()
    theirs = ann.session_record()
    assert mine["objects"] == theirs["objects"] and mine["propagations"] == theirs["propagations"]


def test_resume_refuses_another_image_or_a_bad_file(model, tmp_path):
    ann = annotator(model, volume())
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1)])
    path = ann.save(tmp_path / "s.sam2.json")
    other = annotator(model, volume(n=6))
    with pytest.raises(InputError, match="shape"):
        other.resume(path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable session"):
        load_session(tmp_path / "bad.json")
    with pytest.raises(InputError, match="no session file"):
        load_session(tmp_path / "missing.json")


def test_errors_are_reported_not_raised(model):
    notes = []
    ann = annotator(model, volume())
    ann.on_notify = lambda level, text: notes.append((level, text))
    assert not ann.propagate((3, 0, 0), "both")
    assert notes and notes[-1][0] == "error" and "give a prompt" in notes[-1][1]
    flat = Annotator(model, volume()[0], axis=None, displayed=(0, 1), intensity_range=LIMITS)
    flat.on_notify = lambda level, text: notes.append((level, text))
    flat.sync_slice((0, 0), clicks=[((21, 20), True, 1)])
    assert (flat.labels == 1).any()
    assert not flat.propagate((0, 0))
    assert "2D" in notes[-1][1]


class ManualExecutor:
    """Runs jobs only when told, like worker threads that have not finished yet."""

    def __init__(self):
        self.jobs = []
        self.sync = SyncExecutor()

    def run(self, job):
        self.jobs.append(job)

    def drain(self):
        while self.jobs:
            self.sync.run(self.jobs.pop(0))


def test_quick_clicks_replaced_in_the_queue_undo_together(model):
    data = volume()
    ex = ManualExecutor()
    ann = annotator(model, data, executor=ex)
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1)])
    ex.drain()
    first = ann.labels.copy()
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1), ((3, 14, 14), False, 1)])  # runs
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1), ((3, 14, 14), False, 1), ((3, 25, 25), True, 1)])
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1), ((3, 14, 14), False, 1), ((3, 25, 25), True, 1),
                                      ((3, 10, 40), False, 1)])  # replaces the queued third click
    ex.drain()
    ann.undo()
    ex.drain()
    ann.undo()
    ex.drain()
    np.testing.assert_array_equal(ann.labels, first)
    assert ann.prompts_on_slice((3, 0, 0))[1].labels == (1,)


def test_a_correction_during_a_propagation_and_undo(model):
    data = volume()
    ann = annotator(model, data)
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1)])
    before = ann.labels.copy()
    seen, said = [], []
    ann.on_status = said.append

    def on_labels(_replaced):
        seen.append(1)
        if len(seen) == 3:  # mid-run: a correction on another slice, and a refused deletion
            ann.sync_slice((6, 0, 0), clicks=[((6, 24, 20), True, 1)])
            ann.delete_object(1)

    ann.on_labels = on_labels
    ann.propagate((3, 0, 0), "both")
    ann.on_labels = lambda _r: None
    assert (ann.labels == 1).any() and 1 in ann.objects  # the deletion was refused
    assert any("cannot be deleted" in t for t in said)
    assert ann.undo() == "prompt"  # the correction first
    assert ann.undo() == "propagation"
    np.testing.assert_array_equal(ann.labels, before)


def test_4d_deleting_one_time_points_prompt_keeps_the_object(model):
    data = np.stack([volume(n=4, seed=s) for s in range(3)])  # T Z Y X
    ann = annotator(model, data, axis=1, displayed=(2, 3))
    ann.sync_slice((0, 2, 0, 0), clicks=[((0, 2, 21, 20), True, 1)])
    ann.sync_slice((1, 2, 0, 0), clicks=[((1, 2, 21, 20), True, 1)])
    ann.new_object()
    ann.sync_slice((2, 1, 0, 0), clicks=[((2, 1, 30, 43), True, 2)])
    t1 = ann.labels[1].copy()
    ann.sync_slice((0, 2, 0, 0), clicks=[])  # the click at T=0 deleted
    assert not (ann.labels[0] == 1).any()
    np.testing.assert_array_equal(ann.labels[1], t1)
    assert [r.obj_id for r in ann.object_table()] == [1, 2]
    assert ann.propagate((2, 1, 0, 0), "both")  # only object 2 lives at T=2
    assert ann.history[-1]["objects"] == [2]
    assert (ann.labels[2] == 2).sum() > (t1 == 2).sum()
    assert not (ann.labels[2] == 1).any()


def test_resume_replays_every_recorded_propagation_with_workers_that_finish_later(model, tmp_path):
    data = volume()
    ann = annotator(model, data)
    ann.sync_slice((3, 0, 0), clicks=[((3, 21, 20), True, 1)])
    ann.propagate((3, 0, 0), "forward")
    ann.new_object()
    ann.sync_slice((4, 0, 0), clicks=[((4, 30, 44), True, 2)])
    ann.propagate((4, 0, 0), "backward")
    ann.sync_slice((6, 0, 0), clicks=[((6, 24, 20), True, 1)])
    ann.propagate((6, 0, 0), "both")
    assert len(ann.history) == 3
    path = ann.save(tmp_path / "s.sam2.json")
    ex = ManualExecutor()
    again = annotator(model, data, executor=ex)
    again.resume(path, propagate=True)
    ex.drain()
    assert len(again.history) == 3
    assert not again.can_undo or again.last_change == "propagation"  # the resumed prompts are not undone


def test_labels_saved_in_another_axis_order_read_back(tmp_path):
    from napari_sam2.io import read_labels, write_labels

    rng = np.random.default_rng(0)
    zt = rng.integers(0, 5, (3, 4, 6, 7)).astype(np.uint16)  # a layer whose axes are Z T Y X
    write_labels(tmp_path / "zt.tif", zt, axes="ZTYX")
    np.testing.assert_array_equal(read_labels(tmp_path / "zt.tif", "ZTYX", zt.shape), zt)
    one = rng.integers(0, 5, (1, 5, 6, 7)).astype(np.uint16)  # T of size 1
    write_labels(tmp_path / "one.tif", one, axes="TZYX")
    np.testing.assert_array_equal(read_labels(tmp_path / "one.tif", "TZYX", one.shape), one)
    with pytest.raises(InputError, match="shape"):
        read_labels(tmp_path / "one.tif", "TZYX", (2, 5, 6, 7))
