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
