"""Precision policy of the loss: half-precision inputs are computed in float32, float64 stays float64
(so the float64 reference tests exercise the same code)."""

from __future__ import annotations

import torch
from torch import Tensor

from axolotl_xkd.options import DTYPE_NAMES


def upcast(tensor: Tensor) -> Tensor:
    """`tensor` in float32 unless it is already float32 or float64."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` (one of options.DTYPE_NAMES, the names configs and commands accept)."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not one of {DTYPE_NAMES}")
    return getattr(torch, name)
