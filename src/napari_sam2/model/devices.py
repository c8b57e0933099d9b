"""Choosing a device and a fast dtype."""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from .preprocess import InputError


def pick_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; explicit names are checked.

    A name this machine cannot use raises :class:`InputError` (a ``ValueError``)
    that says what is available instead.
    """
    name = "auto" if device is None else str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:  # torch's message lists every backend it knows; keep it short
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda (or cuda:N) or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {name!r} was asked for, but CUDA is not available on this machine "
                "(PyTorch sees no CUDA GPU); use device 'cpu' or 'auto' (--device cpu / --device auto)"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(
                f"device {name!r} was asked for, but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); use one of those, or 'auto'"
            )
    if dev.type == "mps" and not _mps_available():
        raise InputError(
            f"device {name!r} was asked for, but Apple MPS is not available on this machine; "
            "use device 'cpu' or 'auto' (--device cpu / --device auto)"
        )
    return dev


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on the device's type, or nothing when dtype is None/float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def supports_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 is a speed-up (not an emulation) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:
            return False
    return False


#: input sizes from which bfloat16 tracks faster than float32 where the hardware runs it
#: natively (docs/benchmarks.md, "Fast mode per model"): on a CPU with AVX-512 BF16,
#: 2.1-tiny at 1024 px tracks 2.2-2.8 x faster in bfloat16, while the nano model at 128 px
#: is slower (5.1 s against 2.8 s: conversions outweigh the small matrix products)
FAST_MIN_IMAGE_SIZE = 512


def default_fast(image_size: int, device: Union[str, torch.device, None] = "auto") -> bool:
    """Whether fast mode (bfloat16) should be on by default for a model of this input size
    on ``device``: only where the hardware runs bfloat16 natively and it pays off."""
    try:
        dev = pick_device(device)
    except InputError:
        return False
    return int(image_size) >= FAST_MIN_IMAGE_SIZE and supports_bfloat16(dev)
