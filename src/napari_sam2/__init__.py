"""napari-sam2: Segment Anything 2 for microscopy stacks and time series in napari.

This module stays light on purpose (napari imports plugins at start-up):
torch and Qt load only when the engine (``napari_sam2.model``) or a widget is used.
"""

try:
    from importlib.metadata import version as _version

    __version__ = _version("napari-sam2")
except Exception:  # pragma: no cover - not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
