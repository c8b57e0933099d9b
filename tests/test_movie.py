"""4D (T-Z-Y-X): every object followed through z and over time from prompts at t = 0 only
(issue 18). Expectations: the generated truth, and hand-built prompts."""

from __future__ import annotations

import numpy as np
import pytest
from _stacks import moving_nuclei_movie

from napari_sam2.model import InputError
from napari_sam2.model.metrics import dice
from napari_sam2.model.movie import segment_movie


def clicks_at_start(truth):
    """One positive click per nucleus at t = 0, at the centre of its largest slice (by hand)."""
    points = {}
    for i in [v for v in np.unique(truth[0]) if v > 0]:
        areas = (truth[0] == i).sum(axis=(1, 2))
        z = int(np.argmax(areas))
        ys, xs = np.nonzero(truth[0][z] == i)
        points[(z, int(i))] = ([[float(xs.mean()), float(ys.mean())]], [1])
    return points


@pytest.mark.parametrize("seed", [0, 1])
def test_nuclei_keep_their_ids_through_every_time_point(nano, seed):
    movie, truth = moving_nuclei_movie(t=4, seed=seed)
    events = []
    labels = segment_movie(nano, movie, points=clicks_at_start(truth), progress=events.append)
    assert labels.shape == movie.shape
    assert [e.time for e in events] == [0, 1, 2, 3] and not any(e.lost for e in events)
    for t in range(movie.shape[0]):
        for i in range(1, int(truth.max()) + 1):
            d = dice(labels[t] == i, truth[t] == i)  # the same id at every time point
            assert d >= 0.6, (t, i, d)


def test_seeds_cancel_and_bad_input(nano):
    movie, truth = moving_nuclei_movie(t=3, seed=2, count=2)
    out = np.zeros(movie.shape, np.uint16)
    calls = []
    segment_movie(nano, movie, seeds=truth[0], out=out, should_stop=lambda: len(calls) >= 1,
                  progress=calls.append)
    assert [e.time for e in calls] == [0]  # stopped after the first time point: it is kept
    assert out[0].any() and not out[1:].any()
    assert set(np.unique(out[0])) == {0, 1, 2}
    with pytest.raises(InputError, match="exactly one of seeds, points or auto"):
        segment_movie(nano, movie)
    with pytest.raises(InputError, match="T x Z x Y x X"):
        segment_movie(nano, movie[0], seeds=truth[0])
    with pytest.raises(InputError, match="label volume of one time point"):
        segment_movie(nano, movie, seeds=truth[0, 0])


def test_cli_movie_equals_the_api(nano, tmp_path, capsys):
    import tifffile

    from napari_sam2.cli import main

    movie, truth = moving_nuclei_movie(t=3, seed=3, count=2)
    tifffile.imwrite(tmp_path / "movie.tif", movie)
    rows = ["slice,y,x,object,positive"] + [f"{z},{xy[0][1]},{xy[0][0]},{obj},1"
                                             for (z, obj), (xy, _l) in clicks_at_start(truth).items()]
    (tmp_path / "clicks.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert main(["movie", str(tmp_path / "movie.tif"), "--points", str(tmp_path / "clicks.csv"), "-o",
                 str(tmp_path / "out.tif"), "--orientations", "1", "--quiet"]) == 0
    written = tifffile.imread(tmp_path / "out.tif")
    expected = segment_movie(nano, movie, points=clicks_at_start(truth))  # the CSV holds the same floats
    np.testing.assert_array_equal(written.reshape(movie.shape), expected)
    assert "2 objects through 3 time points" in capsys.readouterr().out
    tifffile.imwrite(tmp_path / "stack.tif", movie[0])
    assert main(["movie", str(tmp_path / "stack.tif"), "--auto", "-o", str(tmp_path / "x.tif")]) == 1
    assert "a movie is T-Z-Y-X" in capsys.readouterr().err
