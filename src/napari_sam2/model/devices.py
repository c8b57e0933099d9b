"""Choosing a device and a fast dtype."""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch


def pick_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; explicit names are checked."""
    name = "auto" if device is None else str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but PyTorch sees no CUDA device; use device='cpu' or 'auto'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("Apple MPS was asked for but is not available; use device='cpu' or 'auto'")
    return dev


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
