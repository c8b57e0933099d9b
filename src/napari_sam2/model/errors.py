"""The errors napari-sam2 raises on purpose, under one base class.

Each says what was wrong and what to do, in one sentence a user can act on; a caller
(the command line, the widget) catches :class:`NapariSAM2Error` and shows the message,
never a traceback. The subclasses keep the built-in base they had (``ValueError`` for
bad input, ``RuntimeError`` for checkpoints and training), so existing ``except`` clauses
still catch them.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "InputError", "NapariSAM2Error", "TrainingError"]


class NapariSAM2Error(Exception):
    """Base of every error napari-sam2 raises with a message meant for the user."""


class InputError(NapariSAM2Error, ValueError):
    """Bad input from the caller; the message says what was wrong and what to do."""


class CheckpointError(NapariSAM2Error, RuntimeError):
    """A checkpoint could not be downloaded, read or matched to a model."""


class TrainingError(NapariSAM2Error, RuntimeError):
    """Training cannot start or go on (bad data, incompatible checkpoint...)."""
