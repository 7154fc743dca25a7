"""Teacher signals the loss consumes: a full-vocabulary distribution (its logits, or its last hidden states and output
layer) or a top-k record, each with the few operations the loss paths, the store writer and the cross-tokenizer
projection need, so that code reading a signal does not ask which kind it holds:

- `positions` (the leading shape) and `vocab_size` (None for a top-k record, whose vocabulary the record does not say);
- `rows(index)`: the signal at some positions (a slice, bool mask or index tensor over the leading dims);
- `flat()`: the leading dims flattened, (N, ...);
- `cut(vocab_size)`: a dense teacher cut to its first tokens (padded embedding rows); a top-k record as it is;
- `formed(writable=)`: what the per-token terms read, logits formed from hidden states (without gradient);
- `top_k(k)`: the k most likely tokens' log-probs at tau = 1, a block of rows at a time (no (N, V) log-softmax copy).

`kind` ("dense" or "topk") names the math a divergence uses on it (categories.py, fused.py choose by it).

Torch only. Every signal is aligned with the student: position i of a signal is the teacher's distribution over
u_{i+1} given u_<=i, the same position as the student's z_i.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from axolotl_xkd.losses.blocks import row_blocks
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.topk_rule import topk_problem

Index = slice | Tensor | tuple[Tensor, ...]
"""Positions of a signal: a slice, a bool mask or index tensor(s) over its leading dims."""


def _top_k_rows(form: Callable[[slice], Tensor], rows: int, vocab_size: int, k: int) -> tuple[Tensor, Tensor]:
    """(ids, log-probs), (rows, k), of the k largest entries of each of the `rows` rows of logits that `form` gives
    a block of rows at a time (at least float32): the top k of the logits minus their log-sum-exp (ranking the
    logits ranks the log-probs), so no (rows, V) log-softmax exists."""
    ids, values = [], []
    for block in row_blocks(rows, vocab_size):
        logits = form(block)
        top, top_ids = logits.topk(k, dim=-1)
        top -= torch.logsumexp(logits, dim=-1, keepdim=True)
        ids.append(top_ids)
        values.append(top)
    if not ids:
        empty = form(slice(0, 0))
        return empty.new_zeros((0, k), dtype=torch.long), empty.new_zeros((0, k))
    return torch.cat(ids), torch.cat(values)


@dataclass(frozen=True)
class DenseSignal:
    """Full-vocabulary teacher logits, (B, T, V). Temperature is applied by the loss."""

    logits: Tensor
    kind: ClassVar[str] = "dense"

    @property
    def positions(self) -> torch.Size:
        """The leading shape, (B, T) or (N,)."""
        return self.logits.shape[:-1]

    @property
    def vocab_size(self) -> int:
        """Tokens of each position's distribution."""
        return self.logits.shape[-1]

    def rows(self, index: Index) -> DenseSignal:
        """The signal at positions `index`."""
        return DenseSignal(self.logits[index])

    def flat(self) -> DenseSignal:
        """The positions flattened, (N, V)."""
        return DenseSignal(self.logits.reshape(-1, self.vocab_size))

    def cut(self, vocab_size: int) -> DenseSignal:
        """The logits of the first `vocab_size` tokens."""
        return DenseSignal(self.logits[..., :vocab_size])

    def formed(self, *, writable: bool = False) -> DenseSignal:
        """The logits at least in float32; `writable`: a fresh tensor the caller may overwrite (fused.py does)."""
        fresh = upcast(self.logits)
        return DenseSignal(fresh.clone() if writable and fresh is self.logits else fresh)

    @torch.no_grad()
    def top_k(self, k: int) -> TopKSignal:
        """The k most likely tokens of each position and their log-probs at tau = 1, (..., k)."""
        flat = self.logits.reshape(-1, self.vocab_size)
        ids, values = _top_k_rows(lambda block: upcast(flat[block]), flat.shape[0], self.vocab_size, k)
        return TopKSignal(ids.reshape(*self.positions, k), values.reshape(*self.positions, k))


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
    kind: ClassVar[str] = "topk"

    @property
    def positions(self) -> torch.Size:
        """The leading shape, (B, T) or (N,)."""
        return self.logprobs.shape[:-1]

    @property
    def vocab_size(self) -> None:
        """None: a record does not say how many tokens its tail holds (the loss is told the student's)."""
        return None

    @property
    def width(self) -> int:
        """Slots of each position's record."""
        return self.logprobs.shape[-1]

    def rows(self, index: Index) -> TopKSignal:
        """The records at positions `index`."""
        return TopKSignal(self.token_ids[index], self.logprobs[index])

    def flat(self) -> TopKSignal:
        """The positions flattened, (N, k)."""
        return TopKSignal(self.token_ids.reshape(-1, self.width), self.logprobs.reshape(-1, self.width))

    def cut(self, vocab_size: int) -> TopKSignal:
        """The record as it is: its ids are checked against the vocabulary by `validate`, never cut."""
        return self

    def formed(self, *, writable: bool = False) -> TopKSignal:
        """The record as it is: the per-token terms read it directly and never write into it."""
        return self

    def top_k(self, k: int) -> TopKSignal:
        """The k most likely entries of each record (the record itself, in its own order, when k covers it)."""
        if k >= self.width:
            return self
        values, slots = self.logprobs.topk(k, dim=-1)
        return TopKSignal(self.token_ids.gather(-1, slots), values)

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
    """Full-vocabulary teacher given as its last hidden states (B, T, H_T) and output layer (V, H_T), bias (V,)
    optional.

    Its logits hidden @ weight^T (+ bias) are formed a block of positions at a time where they are read (the chunked
    loss a chunk at a time, `log_probs` and `top_k` a block of rows at a time), so the full (B, T, V) teacher logits
    never exist. Formed without gradient: a teacher is frozen.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    kind: ClassVar[str] = "dense"

    @property
    def positions(self) -> torch.Size:
        """The leading shape, (B, T) or (N,)."""
        return self.hidden.shape[:-1]

    @property
    def vocab_size(self) -> int:
        """Tokens of each position's distribution: the output layer's rows."""
        return self.weight.shape[0]

    def rows(self, index: Index) -> DenseHiddenSignal:
        """The signal at positions `index` (the output layer is shared)."""
        return DenseHiddenSignal(self.hidden[index], self.weight, self.bias)

    def flat(self) -> DenseHiddenSignal:
        """The positions flattened, hidden states (N, H_T)."""
        return DenseHiddenSignal(self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight, self.bias)

    def cut(self, vocab_size: int) -> DenseHiddenSignal:
        """The output layer's first `vocab_size` rows."""
        bias = self.bias[:vocab_size] if self.bias is not None else None
        return DenseHiddenSignal(self.hidden, self.weight[:vocab_size], bias)

    @torch.no_grad()
    def _logits(self, hidden: Tensor) -> Tensor:
        """The output layer on `hidden` (n, H_T) -> (n, V), in the teacher's dtype."""
        return torch.nn.functional.linear(hidden, self.weight, self.bias)

    def formed(self, *, writable: bool = False) -> DenseSignal:
        """The logits of every position (form a `rows` block first), at least float32 where `writable`."""
        logits = self._logits(self.hidden)
        return DenseSignal(upcast(logits) if writable else logits)

    def log_probs(self, index: Index) -> Tensor:
        """log_softmax of the logits at positions `index`, at least float32: what a projection reads a block of rows
        at a time (cross_tokenizer.project)."""
        return torch.log_softmax(upcast(self._logits(self.hidden[index])), dim=-1)

    def top_k(self, k: int) -> TopKSignal:
        """The k most likely tokens of each position and their log-probs at tau = 1, (..., k), the logits formed a
        cache-sized block of rows at a time."""
        hidden = self.hidden.reshape(-1, self.hidden.shape[-1])
        ids, values = _top_k_rows(lambda block: upcast(self._logits(hidden[block])), hidden.shape[0],
                                  self.vocab_size, k)
        return TopKSignal(ids.reshape(*self.positions, k), values.reshape(*self.positions, k))


TeacherSignal = DenseSignal | TopKSignal
