"""One geometry (model.geometry), one prompt check (model.prompts), one declared session
interface (model.session): conversions against values worked out by hand, the same error
for the same bad prompt everywhere, and both session kinds offering the whole interface."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch

from napari_sam2.model import ImagePredictor, InputError, build_model
from napari_sam2.model import ensemble as ensemble_module
from napari_sam2.model.config import NANO
from napari_sam2.model.ensemble import EnsembleSession
from napari_sam2.model.geometry import (
    AxisView,
    corners_to_box,
    data_to_view,
    fixed_coords,
    labels_index,
    mask_to_model,
    on_slice,
    orient,
    orient_xy,
    point_rc,
    rc_to_xy,
    unorient,
    view_to_data,
    xy_to_model,
)
from napari_sam2.model.session import Session
from napari_sam2.model.video import StackSession
from napari_sam2.segmenter import StackSegmenter

H, W = 48, 64  # slices of the prompt tests: not square, not the model's size

ALL = slice(None)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(NANO)  # random weights: only shapes and checks matter here


# ---------------------------------------------------------------- data axes <-> view <-> (x, y)


def test_a_transposed_view_by_hand():
    """A Z-X-Y array shown with Y as rows and X as columns (displayed = (2, 1))."""
    data = np.arange(4 * 6 * 5).reshape(4, 6, 5)  # Z X Y
    view = AxisView(data, axis=0, displayed=(2, 1), fixed={}, rgb=False)
    assert view.shape == (4, 5, 6) and len(view) == 4
    np.testing.assert_array_equal(view[1], data[1].T)
    # a click at data coordinate (z=1, x=3, y=4) is row 4, column 3 of the view: (x, y) = (3, 4)
    rc = point_rc((1.0, 3.0, 4.0), (2, 1))
    assert rc == (4.0, 3.0)
    assert view[1][4, 3] == data[1, 3, 4]
    np.testing.assert_array_equal(rc_to_xy([rc]), [[3.0, 4.0]])
    # a view-order mask lands on the same voxel in data order, and back
    m = np.zeros((5, 6), bool)
    m[4, 3] = True
    d = view_to_data(m, (2, 1))
    assert d.shape == (6, 5) and d[3, 4] and d.sum() == 1
    np.testing.assert_array_equal(data_to_view(d, (2, 1)), m)
    # not transposed: unchanged
    assert view_to_data(m, (1, 2)) is m and data_to_view(m, (1, 2)) is m


def test_rgb_slices_keep_their_channels_last():
    data = np.arange(3 * 4 * 5 * 3).reshape(3, 4, 5, 3)  # Z Y X C
    view = AxisView(data, axis=0, displayed=(2, 1), fixed={}, rgb=True)
    assert view.shape == (3, 5, 4, 3)
    np.testing.assert_array_equal(view[2], data[2].transpose(1, 0, 2))
    assert view.index(2) == (2, ALL, ALL)


def test_positions_and_labels_indices_by_hand():
    # T Z Y X, propagated along Z, Y and X shown
    pos = (3, 7, 10, 11)
    assert fixed_coords(pos, 4, 1, (2, 3)) == {0: 3}
    assert labels_index(4, 1, (2, 3), {0: 3}, 5) == (3, 5, ALL, ALL)
    assert labels_index(4, 1, (2, 3), {0: 3}) == (3, ALL, ALL, ALL)  # the session's block
    assert labels_index(2, None, (0, 1), {}, 0) == (ALL, ALL)  # a 2D image
    # the slice shown at a position: displayed axes ignored, others rounded
    assert on_slice((3.2, 6.6, 0.0, 99.0), pos, (2, 3))
    assert not on_slice((3.2, 7.6, 0.0, 0.0), pos, (2, 3))
    assert not on_slice((2.0, 7.0, 10.0, 11.0), pos, (2, 3))
    # a box from two opposite corners given in any order, (row, column) -> (x0, y0, x1, y1)
    np.testing.assert_array_equal(corners_to_box([[8, 2], [1, 6]]), [2, 1, 6, 8])
    np.testing.assert_array_equal(corners_to_box([[1, 2], [1, 6], [8, 6], [8, 2]]), [2, 1, 6, 8])


def test_the_segmenter_uses_the_same_geometry():
    """StackSegmenter's public conversions give what the functions give (T Z X Y, X and Y
    shown transposed); no session is opened, so no model is needed."""
    data = np.zeros((2, 3, 6, 5), np.uint8)
    data[1, 2, 3, 4] = 9
    seg = StackSegmenter(None, data, axis=1, displayed=(3, 2))
    pos = (1, 2, 0, 0)
    assert seg.key(pos) == (1,)
    assert seg.label_index(pos, 2) == (1, 2, ALL, ALL)
    assert seg.block_index(pos) == (1, ALL, ALL, ALL)
    assert seg.view(pos)[2][4, 3] == 9  # row Y=4, column X=3
    m = np.zeros((5, 6), bool)
    m[4, 3] = True
    assert seg.to_data_order(m)[3, 4]


# ---------------------------------------------------------------- (x, y) <-> model input


def test_model_input_scaling_by_hand():
    # 64 wide -> 128: x doubles; 48 high -> 128: y times 8/3
    got = xy_to_model(np.array([[10.0, 6.0], [0.0, 47.0]], np.float32), (H, W), 128)
    np.testing.assert_allclose(got, [[20.0, 16.0], [0.0, 47 * 128 / 48]], rtol=1e-6)
    assert got.dtype == np.float32
    # batches (B P 2) scale the same way
    np.testing.assert_allclose(xy_to_model(np.ones((2, 3, 2), np.float32), (H, W), 128)[1, 2], [2.0, 128 / 48])


def test_mask_to_model_by_hand():
    left = np.zeros((32, 64), bool)
    left[:, :32] = True
    t = mask_to_model(left, 128)
    assert t.shape == (1, 1, 128, 128)
    expected = np.zeros((128, 128), np.float32)
    expected[:, :64] = 1.0  # the left half of the slice is the left half of the input
    np.testing.assert_array_equal(t[0, 0].numpy(), expected)
    same = np.random.default_rng(0).random((128, 128)) > 0.5
    np.testing.assert_array_equal(mask_to_model(same, 128)[0, 0].numpy(), same.astype(np.float32))


# ---------------------------------------------------------------- orientations


def test_orientations_by_hand_on_a_non_square_array():
    a = torch.arange(6).reshape(2, 3)  # [[0, 1, 2], [3, 4, 5]]
    assert orient(a, 1, False).tolist() == [[2, 5], [1, 4], [0, 3]]  # a quarter turn counter-clockwise
    assert orient(a, 1, True).tolist() == [[5, 2], [4, 1], [3, 0]]  # then mirrored left-right
    assert orient(a, 2, False).tolist() == [[5, 4, 3], [2, 1, 0]]
    assert orient(a, 0, True).tolist() == [[2, 1, 0], [5, 4, 3]]
    b = torch.arange(2 * 3 * 5).reshape(2, 3, 5)
    for k in range(4):
        for flip in (False, True):
            by_hand = np.rot90(b.numpy(), k, axes=(-2, -1))
            by_hand = np.flip(by_hand, -1) if flip else by_hand
            np.testing.assert_array_equal(orient(b, k, flip).numpy(), by_hand)
            np.testing.assert_array_equal(unorient(orient(b, k, flip), k, flip).numpy(), b.numpy())


def test_orient_xy_by_hand():
    # side 4, pixel (x=1, y=0): a quarter turn takes input [y, x] to output [size-1-x, y] = [2, 0]
    np.testing.assert_array_equal(orient_xy(np.array([[1.0, 0.0]]), 4, 1, False), [[0.0, 2.0]])
    np.testing.assert_array_equal(orient_xy(np.array([[1.0, 0.0]]), 4, 0, True), [[2.0, 0.0]])
    np.testing.assert_array_equal(orient_xy(np.array([[1.0, 0.0]]), 4, 2, False), [[2.0, 3.0]])
    marker = torch.zeros(4, 4)
    marker[0, 1] = 1
    for k in range(4):
        for flip in (False, True):
            r, c = np.argwhere(orient(marker, k, flip).numpy())[0]
            np.testing.assert_array_equal(orient_xy(np.array([[1.0, 0.0]]), 4, k, flip), [[c, r]])


# ---------------------------------------------------------------- one prompt check


BAD_PROMPTS = [
    {"points": [[10, 10], [20, 20]], "labels": [1]},
    {"points": [[10, 10]], "labels": [5]},
    {"points": [[10, 10]]},
    {"labels": [1]},
    {"points": [[np.nan, 10]], "labels": [1]},
    {"points": [[10, 10, 3]], "labels": [1]},
    {"box": [50, 10, 20, 30]},
    {"box": [10, 10, 20, 30], "points": [[5, 5]], "labels": [2]},
    {"points": [[70, 3]], "labels": [1]},  # outside: the predictor says "image", a session "slice"
    {"box": [0, 0, 10, 60]},
]


def _message(fn) -> str:
    with pytest.raises(InputError) as err:
        fn()
    return str(err.value)


@pytest.mark.parametrize("kwargs", BAD_PROMPTS)
def test_the_same_bad_prompt_gets_the_same_message(model, kwargs):
    image = np.random.default_rng(1).integers(0, 255, (2, H, W), dtype=np.uint8)
    predictor = ImagePredictor(model)
    predictor.set_image(image[0])
    from_predictor = _message(lambda: predictor.predict(**kwargs))
    from_session = _message(lambda: StackSession(model, image).add_points(0, 1, **kwargs))
    from_ensemble = _message(lambda: EnsembleSession(model, image, orientations=2).add_points(0, 1, **kwargs))
    assert from_session == from_ensemble
    assert from_session.replace("outside the slice", "outside the image") == from_predictor


def test_what_only_one_side_accepts(model):
    image = np.zeros((2, H, W), np.uint8)
    s = StackSession(model, image)
    with pytest.raises(InputError, match="give points with labels, or a box"):
        s.add_points(0, 1)
    with pytest.raises(InputError, match="use clear=True with a box"):
        s.add_points(0, 1, box=[1, 1, 5, 5], clear=False)
    with pytest.raises(InputError, match=r"box must be \(x0, y0, x1, y1\), got shape \(2, 4\)"):
        s.add_points(0, 1, box=[[1, 1, 5, 5], [2, 2, 6, 6]])  # a session's object has one box
    with pytest.raises(InputError, match="mask must have the slice's shape"):
        EnsembleSession(model, image, orientations=2).add_mask(0, 1, np.ones((3, 3), bool))
    predictor = ImagePredictor(model)
    predictor.set_image(image[0])
    out = predictor.predict(box=[[1, 1, 5, 5], [2, 2, 6, 6]], multimask_output=False)  # one mask per box
    assert out.masks.shape == (2, 1, H, W)


# ---------------------------------------------------------------- one session interface


def _interface() -> list:
    names = set(Session.__annotations__)
    names |= {n for n in vars(Session) if not n.startswith("_")}
    return sorted(names)


def test_both_session_kinds_offer_the_whole_interface(model):
    image = np.zeros((3, H, W), np.uint8)
    names = _interface()
    assert {"add_points", "add_mask", "snapshot", "restore", "propagate", "objects", "frames", "fast"} <= set(names)
    for session in (StackSession(model, image), EnsembleSession(model, image, orientations=4)):
        assert isinstance(session, Session)
        missing = [n for n in names if not hasattr(session, n)]
        assert missing == [], f"{type(session).__name__} lacks {missing}"

    class Partial:  # the check can fail
        frames = num_frames = height = width = fast = None

    assert not isinstance(Partial(), Session)


def test_the_ensemble_uses_only_public_members_of_its_parts():
    """In model/ensemble.py a private name (``x._y``) is only ever read on ``self``."""
    tree = ast.parse(inspect.getsource(ensemble_module))
    private = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert private == []
    assert not any(
        isinstance(node, ast.ClassDef) and any(ast.unparse(b) == "StackSession" for b in node.bases)
        for node in ast.walk(tree)
    ), "the ensemble composes StackSessions instead of subclassing one"
