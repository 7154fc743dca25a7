"""Precision policy of the loss: half-precision inputs are computed in float32, float64 stays float64
(so the float64 reference tests exercise the same code)."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(tensor: Tensor) -> Tensor:
    """`tensor` in float32 unless it is already float32 or float64."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
