"""Teacher signals the loss consumes: a full-vocabulary distribution or a top-k record.

Pure data holders (torch only). Both are aligned with the student: position i of a signal is
the teacher's distribution over u_{i+1} given u_<=i, the same position as the student's z_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DenseSignal:
    """Full-vocabulary teacher logits, (B, T, V). Temperature is applied by the loss."""

    logits: Tensor


@dataclass(frozen=True)
class TopKSignal:
    """Teacher top-k ids (B, T, k) and log-probabilities (B, T, k) over the full vocabulary at tau = 1.

    Entries with log-prob -inf are padding: their id is ignored and their mass belongs to the tail.
    """

    token_ids: Tensor
    logprobs: Tensor

    @property
    def valid(self) -> Tensor:
        """(B, T, k) bool: True where the slot holds a real teacher entry."""
        return torch.isfinite(self.logprobs)


@dataclass(frozen=True)
class DenseHiddenSignal:
    """Full-vocabulary teacher given as its last hidden states (B, T, H_T) and output layer (V, H_T).

    Bias (V,) optional. The chunked loss forms the teacher logits hidden @ weight^T (+ bias) a chunk
    of positions at a time, so the full (B, T, V) teacher logits never exist.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


TeacherSignal = DenseSignal | TopKSignal
