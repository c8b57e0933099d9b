"""The bundled SAM 2 engine: pure PyTorch, no napari or Qt imports.

Main entry points:

- :func:`load_model` builds a registered variant and loads its weights
  (official checkpoints are fetched into a per-user cache on first use);
- :class:`ImagePredictor` segments one 2D image from points, boxes or masks.
"""

from .checkpoint import CHECKPOINTS, CheckpointError, load_model
from .config import MODELS, HieraConfig, SAM2Config, get_config
from .errors import NapariSAM2Error, TrainingError
from .predictor import ImagePredictor, Prediction
from .preprocess import InputError
from .sam2 import SAM2Model, build_model

__all__ = [
    "CHECKPOINTS",
    "MODELS",
    "CheckpointError",
    "HieraConfig",
    "ImagePredictor",
    "InputError",
    "NapariSAM2Error",
    "Prediction",
    "SAM2Config",
    "SAM2Model",
    "TrainingError",
    "build_model",
    "get_config",
    "load_model",
]
