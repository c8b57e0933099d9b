"""napari-sam2: Segment Anything 2 for microscopy stacks and time series in napari.

This module stays light on purpose (napari imports plugins at start-up):
torch and Qt load only when the engine (``napari_sam2.model``) or a widget is used.
"""

import os as _os

# OpenMP threads that wait for each other spin for a long time by default (libgomp:
# 300,000 spins); when another process or the viewer's own thread takes a core, every
# parallel region then waits for a descheduled thread and propagation slowed 3-8x on two
# cores (40x seen by a user). A short spin keeps the idle speed and cuts that by about a third
# (benchmarks/bench_threads.py, docs/benchmarks.md). Set before torch loads; a value
# the user set is kept.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

try:
    from importlib.metadata import version as _version

    __version__ = _version("napari-sam2")
except Exception:  # pragma: no cover - not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
