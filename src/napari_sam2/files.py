"""Writing files so that a crash or a cancel never leaves one half-written.

Every file napari-sam2 writes (labels, session and provenance records, checkpoints,
training history, NIfTI volumes, checksums) goes through :func:`atomic_write`: the data
is written to a temporary file beside the target, which then replaces it in one rename.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["atomic_write", "atomic_write_text"]


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (other threads may
    create files meanwhile); else set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write(path: Union[str, Path], write: Callable[[str], Any], *, what: str = "the file",
                 suffix: str = ".part") -> Path:
    """Write a file so that a crash never leaves it half-written: ``write(tmp)`` writes a
    temporary file beside ``path``, which then replaces ``path`` (keeping its permissions,
    or the user's umask for a new file). Errors name ``path``, not the temporary file.
    suffix: the temporary file's ending (a writer that picks its format by the name, e.g.
    ".nii.gz" for nibabel, needs the target's)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, (OSError, ValueError, TypeError)):  # TiffFileError is a ValueError
            raise _write_error(exc, path, tmp, what) from exc
        raise
    return path


def _write_error(exc: BaseException, path: Path, tmp: Optional[str], what: str = "labels") -> Exception:
    """``exc`` restated about ``path``, not the temporary file it happened on."""
    reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
    if tmp:
        reason = reason.replace(str(tmp), str(path)).replace(os.path.basename(tmp), path.name)
    message = f"could not write {what} to {path}: {reason or type(exc).__name__}"
    if isinstance(exc, OSError):
        if exc.errno:
            # keeps the errno (and its subclass: PermissionError, ...) for callers that check it
            return OSError(exc.errno, message)
        return OSError(message)
    return ValueError(message)


def atomic_write_text(path: Union[str, Path], text: str, *, what: str = "the file") -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), what=what)
