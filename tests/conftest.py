import os
import tempfile

# napari writes settings and caches under the user's folders: keep tests away from them
_tmp = tempfile.mkdtemp(prefix="napari-sam2-tests-")
for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
    path = os.path.join(_tmp, var.lower())
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ[var] = path

import pytest  # noqa: E402
import torch  # noqa: E402

# keep test runs reproducible and within the 2 CI cores
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's checkpoint cache from tests."""
    monkeypatch.setenv("NAPARI_SAM2_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture()
def bundled_nano(tmp_path, monkeypatch):
    """Random nano weights exported as the package's bundled file (in a temp folder):
    (model, path, sha256)."""
    from napari_sam2.model import build_model
    from napari_sam2.model import checkpoint as ckpt
    from napari_sam2.model.config import NANO

    torch.manual_seed(0)
    weights = tmp_path / "run" / "weights.pt"
    weights.parent.mkdir()
    model = build_model(NANO)
    torch.save(model.state_dict(), weights)
    target = tmp_path / "bundled" / "nano.pt"
    monkeypatch.setattr(ckpt, "bundled_path", lambda name: target)
    path, digest = ckpt.export_bundled(weights)
    monkeypatch.setitem(ckpt.BUNDLED, NANO.name, (path.name, digest))
    return model, path, digest


@pytest.fixture()
def notices(monkeypatch):
    """What the dock widget tells the user, by level ("error", "info", "warning"), instead
    of napari notifications (the widget module is imported here, not for every test)."""
    from napari_sam2.widgets import sam2_widget as sw

    seen = {"error": [], "info": [], "warning": []}
    for level, messages in seen.items():
        monkeypatch.setattr(sw, f"_notify_{level}", messages.append)
    return seen


@pytest.fixture()
def errors(notices):
    """The error messages the dock widget showed."""
    return notices["error"]


@pytest.fixture(scope="module")
def nano():
    """The bundled nano model (its real weights), loaded once per test module."""
    from napari_sam2.model.checkpoint import load_model

    return load_model("sam2.1_nano_synthetic", None, device="cpu")


@pytest.fixture(scope="module")
def model():
    """2.1-tiny at 128 px with seeded random weights whose object score says "present"
    (tests/_stacks.present_tiny_model); modules needing another size define their own."""
    from _stacks import present_tiny_model

    return present_tiny_model(128)
