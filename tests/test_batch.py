"""Many stacks unattended (issue 17): napari-sam2 batch, serially and on a dask LocalCluster
of 2 worker processes that the tests start and close themselves."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import tifffile
import torch
from test_auto_stack import appearing_blob_stack, one_to_one

from napari_sam2.batch import (
    BatchSettings,
    plan_batch,
    process,
    read_points_csv,
    result_paths,
    run_batch,
)
from napari_sam2.model import InputError

# one torch thread everywhere: float32 sums then agree bit for bit between this process and the workers
SETTINGS = BatchSettings(stop_after=2, threads=1)


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def make_stacks(folder, n=4):
    """n small stacks with a clicks CSV each; returns {stem: truth}."""
    folder.mkdir(parents=True, exist_ok=True)
    truths = {}
    for k in range(n):
        image, truth = appearing_blob_stack(n=12, start=6, seed=20 + k)
        tifffile.imwrite(folder / f"s{k}.tif", image)
        (folder / f"s{k}.csv").write_text(
            "slice,y,x,object,positive\n4,40,40,1,1\n9,92,90,2,1\n9,92,100,2,true\n", encoding="utf-8")
        truths[f"s{k}"] = truth
    return truths


def outputs(out_dir):
    return {p.name: tifffile.imread(p) for p in sorted(out_dir.glob("*.tif"))}


@pytest.mark.parametrize(("text", "expected"), [
    ("x,y,slice,object,positive,note\n10,20,3,1,1,a\n11,21,3,1,0,b\n5,6,1,2,yes,c\n",
     {(3, 1): ([(10.0, 20.0), (11.0, 21.0)], [1, 0]), (1, 2): ([(5.0, 6.0)], [1])}),
    ("\ufeffSlice, Y, X, Object, Positive\n3, 20, 10, 1, TRUE\n\n", {(3, 1): ([(10.0, 20.0)], [1])}),  # a spreadsheet's
    ("slice,y,x,object\n1,2,3,1\n", "positive"),
    ("slice,y,x,object,positive\n9,2,3,1,1\n", "line 2: slice 9 is outside"),
    ("slice,y,x,object,positive\n1,200,3,1,1\n", "outside the slices"),
    ("slice,y,x,object,positive\n3,20,10,1,1.0\n", "line 2: positive must be 1 / 0"),
    ("slice,y,x,object,positive\n", "holds no click"),
])
def test_points_csv_is_read_and_checked(tmp_path, text, expected):
    f = tmp_path / "p.csv"
    f.write_bytes(text.encode("utf-8"))
    if isinstance(expected, dict):
        assert read_points_csv(f, 5, (64, 64)) == expected
    else:
        with pytest.raises(InputError, match=expected):
            read_points_csv(f, 5, (64, 64))


def test_serial_batch_writes_labels_and_provenance_and_resumes(tmp_path, one_thread):
    truths = make_stacks(tmp_path / "in")
    items = plan_batch([str(tmp_path / "in" / "*.tif")], tmp_path / "out", "points")
    assert [os.path.basename(i.output) for i in items] == [f"s{k}_labels.tif" for k in range(4)]
    results = run_batch(items, SETTINGS)
    assert [r.status for r in results] == ["done"] * 4
    for item, r in zip(items, results):
        tif, meta = result_paths(item.output)
        labels = tifffile.imread(tif)
        matched = one_to_one(labels, truths[os.path.basename(item.image)[:-4]])
        assert matched[1] == (1, pytest.approx(matched[1][1])) and matched[1][1] >= 0.7, matched
        assert matched[2][0] == 2 and matched[2][1] >= 0.6, matched
        record = json.loads(meta.read_text())
        assert record["prompts"]["kind"] == "points" and record["objects"] == 2 == r.objects
        assert record["model"]["name"] == "sam2.1_nano_synthetic"
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = run_batch(items, SETTINGS)
    assert [r.status for r in again] == ["skipped"] * 4
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps


def test_a_failing_stack_is_reported_and_the_others_finish(tmp_path, capsys):
    from napari_sam2.cli import main

    make_stacks(tmp_path / "in", n=2)
    (tmp_path / "in" / "broken.tif").write_bytes(b"not a tiff at all")
    (tmp_path / "in" / "broken.csv").write_text("slice,y,x,object,positive\n1,1,1,1,1\n", encoding="utf-8")
    rc = main(["batch", str(tmp_path / "in" / "*.tif"), "-o", str(tmp_path / "out"), "--points", "--stop-after", "2"])
    assert rc == 1
    out, err = capsys.readouterr()
    assert "broken.tif" in err and "FAILED" in err and "Traceback" not in err
    assert "2 done, 0 skipped (finished before), 1 failed of 3 stacks" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "s0_labels.sam2-batch.json", "s0_labels.tif", "s1_labels.sam2-batch.json", "s1_labels.tif"]
    # a missing prompts file is a failure of that stack too
    item = plan_batch([str(tmp_path / "in" / "s0.tif")], tmp_path / "out2", "seeds")[0]
    r = process(item, SETTINGS)
    assert r.status == "failed" and "s0_seeds.tif" in r.error


def test_seeds_and_auto_prompts(tmp_path, one_thread):
    truths = make_stacks(tmp_path / "in", n=1)
    seeds = np.zeros_like(truths["s0"])
    seeds[6][truths["s0"][6] == 1] = 5  # a 3D seed volume: object 5 on slice 6 only
    tifffile.imwrite(tmp_path / "in" / "s0_seeds.tif", seeds)
    r = process(plan_batch([str(tmp_path / "in" / "s0.tif")], tmp_path / "a", "seeds")[0], SETTINGS)
    assert r.status == "done" and r.objects == 1
    labels = tifffile.imread(tmp_path / "a" / "s0_labels.tif")
    assert set(np.unique(labels)) == {0, 5} and one_to_one(labels, truths["s0"])[1][1] >= 0.7
    r = process(plan_batch([str(tmp_path / "in" / "s0.tif")], tmp_path / "b", "auto")[0], SETTINGS)
    assert r.status == "done" and r.objects == 2


def test_local_cluster_equals_serial_and_survives_a_killed_worker(tmp_path, one_thread):
    from distributed import Client, LocalCluster

    make_stacks(tmp_path / "in")
    serial = plan_batch([str(tmp_path / "in" / "*.tif")], tmp_path / "serial", "points")
    assert [r.status for r in run_batch(serial, SETTINGS)] == ["done"] * 4
    want = outputs(tmp_path / "serial")

    items = plan_batch([str(tmp_path / "in" / "*.tif")], tmp_path / "cluster", "points")
    results = run_batch(items, SETTINGS, workers=2)
    assert [r.status for r in results] == ["done"] * 4
    assert len({r.worker for r in results}) == 2  # both worker processes took stacks
    got = outputs(tmp_path / "cluster")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])

    # a worker process killed in the middle of a stack (it is reporting slices): dask runs its task elsewhere
    import threading

    items = plan_batch([str(tmp_path / "in" / "*.tif")], tmp_path / "killed", "points")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        killed = []

        started = []

        def kill():
            busy = [w for w, tasks in client.processing().items() if tasks]
            if busy:
                killed.append(busy[0])
                try:
                    client.run(lambda: os.kill(os.getpid(), signal.SIGKILL), workers=[busy[0]])
                except Exception:  # the worker's connection drops as it exits
                    pass

        def on_slice(_z):  # called on the client's event loop: the kill goes through another thread
            if not started:
                started.append(threading.Thread(target=kill, daemon=True))
                started[0].start()

        results = run_batch(items, SETTINGS, client=client, on_slice=on_slice)
        started[0].join(30)
    # a stack the killed worker had written but not reported is found finished when run again
    assert killed and {r.status for r in results} <= {"done", "skipped"} and len(results) == 4
    got = outputs(tmp_path / "killed")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_batch_reads_a_matching_store_and_refuses_another(tmp_path, one_thread):
    """A stack with an embedding store beside it gives the labels it gives without one; a store
    made with another intensity mapping fails that stack with the reason."""
    from napari_sam2.batch import get_model
    from napari_sam2.model.frames import FrameSource
    from napari_sam2.store import build_store, store_path

    make_stacks(tmp_path / "in", n=2)
    plain = run_batch(plan_batch([str(tmp_path / "in" / "*.tif")], tmp_path / "plain", "points"), SETTINGS)
    assert [r.status for r in plain] == ["done"] * 2
    model = get_model(SETTINGS)
    build_store(store_path(tmp_path / "in" / "s0.tif"), model, FrameSource(tifffile.imread(tmp_path / "in" / "s0.tif")))
    build_store(store_path(tmp_path / "in" / "s1.tif"), model,
                FrameSource(tifffile.imread(tmp_path / "in" / "s1.tif"), (0, 10)))  # another mapping
    stored = run_batch(plan_batch([str(tmp_path / "in" / "*.tif")], tmp_path / "stored", "points"), SETTINGS)
    assert stored[0].status == "done"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "stored" / "s0_labels.tif"),
                                  tifffile.imread(tmp_path / "plain" / "s0_labels.tif"))
    assert stored[1].status == "failed" and "intensities" in stored[1].error


def test_plan_names_and_what_a_glob_leaves_out(tmp_path):
    for name in ("img.001.tif", "img.002.tif", "img.001_seeds.tif", "b.ome.tif"):
        (tmp_path / name).write_bytes(b"")
    items = plan_batch([str(tmp_path / "*.tif")], tmp_path / "out", "seeds")
    assert sorted(os.path.basename(i.output) for i in items) == ["b_labels.tif", "img.001_labels.tif",
                                                                  "img.002_labels.tif"]
    with pytest.raises(InputError, match="only {stem} and {dir}"):
        plan_batch([str(tmp_path / "b.ome.tif")], tmp_path / "out", "points", source="{name}.csv")


def test_a_finished_stack_is_made_again_when_its_run_changed(tmp_path, one_thread):
    from dataclasses import replace

    make_stacks(tmp_path / "in", n=1)
    items = plan_batch([str(tmp_path / "in" / "s0.tif")], tmp_path / "out", "points")
    assert run_batch(items, SETTINGS)[0].status == "done"
    assert run_batch(items, SETTINGS)[0].status == "skipped"
    assert run_batch(items, replace(SETTINGS, stop_after=None))[0].status == "done"  # other settings
    (tmp_path / "in" / "s0.csv").write_text("slice,y,x,object,positive\n4,40,40,1,1\n", encoding="utf-8")
    r = run_batch(items, replace(SETTINGS, stop_after=None))[0]
    assert r.status == "done" and r.objects == 1  # an edited clicks file


def test_slices_are_reported_from_cluster_workers(tmp_path, one_thread):
    make_stacks(tmp_path / "in", n=2)
    items = plan_batch([str(tmp_path / "in" / "*.tif")], tmp_path / "out", "points")
    here = []
    run_batch(items, SETTINGS, on_slice=here.append)
    from distributed import LocalCluster

    seen = []
    items = plan_batch([str(tmp_path / "in" / "*.tif")], tmp_path / "out2", "points")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        results = run_batch(items, SETTINGS, scheduler=cluster.scheduler_address, on_slice=seen.append)  # --scheduler
    assert [r.status for r in results] == ["done"] * 2
    import time

    deadline = time.monotonic() + 10  # events travel worker -> scheduler -> here, maybe after the results
    while len(seen) < len(here) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert here and sorted(seen) == sorted(here)  # every slice of both stacks, as a serial run reports them


def test_ome_zarr_outputs_hold_what_the_tiffs_hold(tmp_path, one_thread):
    import zarr

    from napari_sam2.cli import main

    make_stacks(tmp_path / "in", n=1)
    assert main(["batch", str(tmp_path / "in" / "s0.tif"), "-o", str(tmp_path / "t"), "--points", "--stop-after", "2"]) == 0
    assert main(["batch", str(tmp_path / "in" / "s0.tif"), "-o", str(tmp_path / "z"), "--points", "--stop-after", "2",
                 "--format", "ome-zarr"]) == 0
    group = zarr.open_group(str(tmp_path / "z" / "s0_labels.ome.zarr"), mode="r")
    np.testing.assert_array_equal(np.asarray(group["0"][...]), tifffile.imread(tmp_path / "t" / "s0_labels.tif"))
    ms = group.attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert (tmp_path / "z" / "s0_labels.sam2-batch.json").exists()
    assert not [p for p in (tmp_path / "z").iterdir() if p.name.startswith(".")]


def test_clicks_tracked_on_a_region_around_each_object(tmp_path, one_thread, nano):
    """--roi auto: each object on a 128 px square (the nano model's input) around its clicks,
    worked out by hand here; the expectation is a plain session on each cropped array."""
    from _stacks import paint_by_hand

    from napari_sam2.model.frames import FrameSource
    from napari_sam2.model.video import StackSession

    image, _truth = appearing_blob_stack(n=12, hw=(260, 300), start=6, seed=4)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "w.tif", image)
    (tmp_path / "in" / "w.csv").write_text(
        "slice,y,x,object,positive\n4,40,40,1,1\n9,92,90,2,1\n9,92,100,2,1\n", encoding="utf-8")
    settings = BatchSettings(stop_after=2, threads=1, roi="auto")
    r = process(plan_batch([str(tmp_path / "in" / "w.tif")], tmp_path / "out", "points")[0], settings)
    assert r.status == "done", r.error
    got = tifffile.imread(tmp_path / "out" / "w_labels.tif")

    model = nano
    rng = FrameSource(image).intensity_range  # the stack's own mapping, as the batch uses
    # object 1: centred on (40, 40), moved inside the slice: rows 0:128, columns 0:128;
    # object 2: centred on (y 92, x 95): rows 28:156, columns 31:159
    want = np.zeros(image.shape, np.uint32)
    for obj, (top, left), clicks in ((1, (0, 0), [(4, [[40, 40]])]), (2, (28, 31), [(9, [[90, 92], [100, 92]])])):
        s = StackSession(model, np.ascontiguousarray(image[:, top:top + 128, left:left + 128]), intensity_range=rng)
        for z, xy in clicks:
            s.add_points(z, obj, points=np.array(xy, float) - [left, top], labels=[1] * len(xy), clear=False)
        for z, masks in s.propagate("both", stop_after_absent=2):
            full = np.zeros(image.shape[1:], bool)
            full[top:top + 128, left:left + 128] = masks[obj]
            paint_by_hand(want, (z,), {obj: full})
    assert (want == 1).any() and (want == 2).any()
    np.testing.assert_array_equal(got, want)
    meta = json.loads(result_paths(str(tmp_path / "out" / "w_labels.tif"))[1].read_text())
    assert meta["run"]["settings"]["roi"] == "auto"


def test_roi_option_is_checked(tmp_path, capsys):
    from napari_sam2.cli import main

    truths = make_stacks(tmp_path / "in", n=1)
    assert truths
    for bad, says in (("--roi=5:1,0:9", "top < bottom"), ("--roi=nonsense", "ROW0:ROW1,COL0:COL1")):
        assert main(["batch", str(tmp_path / "in" / "s0.tif"), "-o", str(tmp_path / "o"), "--points", bad]) == 1
        assert says in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "in" / "s0.tif"), "-o", str(tmp_path / "o"), "--auto", "--roi", "auto"]) == 1
    assert "--roi applies to --points and --seeds" in capsys.readouterr().err
