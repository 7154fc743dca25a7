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


PROB_SUM_TOLERANCE = 1e-2
"""How far a position's stored top-k probabilities may sum above 1: float16 rounding of the log-probs
moves the sum by at most about 2^-11 * entropy (<= 12 nats), so 1e-2 leaves room while catching real errors."""


@dataclass(frozen=True)
class TopKSignal:
    """Teacher top-k ids (B, T, k) and log-probabilities (B, T, k) over the full vocabulary at tau = 1.

    Entries with log-prob -inf are padding: their id is ignored and their mass belongs to the tail.
    The loss trusts this record (checking it costs a device sync per batch): a NaN or +inf log-prob would be
    read as padding, a sum above 1 renormalised and duplicate ids counted twice. Sources of untrusted data
    (a store, a server response) call `validate` once when they build the signal.
    """

    token_ids: Tensor
    logprobs: Tensor

    @property
    def valid(self) -> Tensor:
        """(B, T, k) bool: True where the slot holds a real teacher entry."""
        return torch.isfinite(self.logprobs)

    def validate(self, *, vocab_size: int | None = None, tolerance: float = PROB_SUM_TOLERANCE) -> None:
        """Raise ValueError at the first position the loss would misread: NaN, +inf or positive log-probs,
        probabilities summing above 1 + tolerance, duplicate ids, or ids outside [0, vocab_size)."""
        if self.token_ids.shape != self.logprobs.shape or self.token_ids.is_floating_point():
            raise ValueError(
                f"TopKSignal: token_ids {tuple(self.token_ids.shape)} ({self.token_ids.dtype}) and logprobs "
                f"{tuple(self.logprobs.shape)} must have the same shape, with integer ids"
            )
        lps = self.logprobs.detach().double().flatten(0, -2)
        ids = self.token_ids.flatten(0, -2).long()
        valid = torch.isfinite(lps)
        # Padded slots get distinct negative ids, so only real entries can collide.
        slots = torch.arange(1, ids.shape[-1] + 1, device=ids.device)
        ordered = torch.where(valid, ids, -slots).sort(-1).values
        checks = [
            (torch.isnan(lps).any(-1), "a NaN log-prob (read as padding, its mass moved to the tail)"),
            (torch.isposinf(lps).any(-1), "a +inf log-prob (read as padding)"),
            ((valid & (lps > 0)).any(-1), "a log-prob above 0"),
            (lps.exp().sum(-1) > 1.0 + tolerance,
             f"probabilities summing above 1 (+{tolerance} rounding tolerance; they would be renormalised)"),
            ((ordered[:, 1:] == ordered[:, :-1]).any(-1), "the same token id twice (its mass counted twice)"),
        ]
        if vocab_size is not None:
            checks.append(((valid & ((ids < 0) | (ids >= vocab_size))).any(-1),
                           f"a token id outside the vocabulary [0, {vocab_size})"))
        found = torch.stack([bad.any() for bad, _ in checks]).tolist() if lps.numel() else []
        for (bad, what), hit in zip(checks, found):
            if hit:
                position = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"TopKSignal: position {position} (flattened over the leading dims) has {what}. The loss trusts "
                    "its teacher record, so this would train on a wrong distribution; fix the teacher data (rerun "
                    "`axolotl xkd precompute`) or the server that sent it."
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
