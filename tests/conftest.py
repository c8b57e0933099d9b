import os

import pytest
import torch

# keep test runs reproducible and within the 2 CI cores
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's checkpoint cache from tests."""
    monkeypatch.setenv("NAPARI_SAM2_CACHE", str(tmp_path_factory.mktemp("cache")))
