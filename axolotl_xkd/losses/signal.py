"""Teacher signals the loss consumes: a full-vocabulary distribution or a top-k record.

Pure data holders (torch only). Both are aligned with the student: position i of a signal is
the teacher's distribution over u_{i+1} given u_<=i, the same position as the student's z_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from axolotl_xkd.topk_rule import topk_problem


@dataclass(frozen=True)
class DenseSignal:
    """Full-vocabulary teacher logits, (B, T, V). Temperature is applied by the loss."""

    logits: Tensor


@dataclass(frozen=True)
class TopKSignal:
    """Teacher top-k ids (B, T, k) and log-probabilities (B, T, k) over the full vocabulary at tau = 1.

    Entries with log-prob -inf are padding: their id is ignored and their mass belongs to the tail.
    The loss trusts this record (checking it costs a device sync per batch): a NaN or +inf log-prob would be
    read as padding, a sum above 1 renormalised and duplicate ids counted twice. Sources of untrusted data check
    their records once with the same rule (`axolotl_xkd.topk_rule`): the store reader and the server client on
    their rows and answers, `validate` on a signal built elsewhere.
    """

    token_ids: Tensor
    logprobs: Tensor

    @property
    def valid(self) -> Tensor:
        """(B, T, k) bool: True where the slot holds a real teacher entry."""
        return torch.isfinite(self.logprobs)

    def validate(self, *, vocab_size: int | None = None) -> None:
        """Raise ValueError at the first position the loss would misread, by the one top-k rule
        (`axolotl_xkd.topk_rule`: NaN, +inf or positive log-probs, probabilities summing above 1, duplicate ids,
        ids outside [0, vocab_size)); also a shape or dtype mismatch."""
        problem = topk_problem(self.token_ids.detach().cpu().numpy(), self.logprobs.detach().double().cpu().numpy(),
                               vocab_size=vocab_size)
        if problem is not None:
            raise ValueError(
                f"TopKSignal: position {problem.position} (flattened over the leading dims) has {problem.what}. The "
                "loss trusts its teacher record, so this would train on a wrong distribution; fix the teacher data "
                "(rerun `axolotl xkd precompute`) or the server that sent it."
            )


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
