"""The one validity rule of a teacher's top-k record: what a store row, a teacher server's answer and a
`TopKSignal` must satisfy before the loss reads them.

The loss trusts its top-k input (checking it there would cost a device sync per batch): a NaN or +inf log-prob
would be read as padding, a sum above 1 renormalised, a duplicate id counted twice, an id outside the vocabulary
would index another token. So each untrusted source checks its records once with `topk_problem`, where it can name
the bad one: the store reader (file, row, field: `store/format.py`), the server client (URL, sequence:
`server/protocol.py`) and `losses.signal.TopKSignal.validate`.

A leaf over numpy arrays (torch tensors are handed over as numpy): the server client must stay free of torch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

LOGPROB_TOLERANCE = 1e-4
"""How far above 0 a log-prob may lie. A teacher computes log p = z - logsumexp(z) in float32; for a near-certain
token this rounds to a few float32 steps of the largest logit above 0 (2^-24 * |z| each, below 1e-5 for logits
under 100), and vLLM sends such values as they are. 1e-4 accepts that rounding and nothing a real error makes; the
server parser then clamps them to 0 (the store's packed encoding stores them as 0 already)."""

PROB_SUM_TOLERANCE = 1e-2
"""How far a position's top-k probabilities may sum above 1: float16 rounding of stored log-probs moves the sum by
at most about 2^-11 * entropy (<= 12 nats), so 1e-2 leaves room while catching real errors."""

IDS, LOGPROBS = "token_ids", "logprobs"


class TopKProblem(NamedTuple):
    """The first bad position of a top-k record and what is wrong there."""

    position: int  # counted over the record's leading dimensions, flattened
    field: str  # IDS or LOGPROBS: the part of the record at fault
    what: str  # in words, for the caller's error message


def topk_problem(token_ids: np.ndarray, logprobs: np.ndarray, *, vocab_size: int | None = None) -> TopKProblem | None:
    """The first position of a top-k record (..., k) that the loss would misread, or None when all are valid.

    Entries with log-prob -inf are padding (their id is ignored). A position is refused for a NaN or +inf
    log-prob, a log-prob above LOGPROB_TOLERANCE, probabilities summing above 1 + PROB_SUM_TOLERANCE, an id outside
    [0, vocab_size) (or a negative one, without vocab_size) or the same id twice among its real entries.
    """
    ids, lps = np.asarray(token_ids), np.asarray(logprobs, dtype=np.float64)
    if ids.shape != lps.shape or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"top-k token_ids {ids.shape} ({ids.dtype}) and logprobs {lps.shape} must have the same "
                         "shape, with integer ids")
    if lps.size == 0:
        return None
    k = lps.shape[-1]
    lps, ids = lps.reshape(-1, k), ids.reshape(-1, k).astype(np.int64)
    valid = np.isfinite(lps)
    mass = np.exp(np.where(valid, lps, -np.inf)).sum(-1)
    # Padded slots get distinct negative ids, so only real entries can collide.
    ordered = np.sort(np.where(valid, ids, -np.arange(1, k + 1)), axis=-1)
    outside = ids < 0 if vocab_size is None else (ids < 0) | (ids >= vocab_size)
    vocabulary = "negative" if vocab_size is None else f"outside the vocabulary [0, {vocab_size})"
    checks = [
        (np.isnan(lps).any(-1), LOGPROBS, "a NaN log-prob (read as padding, its mass moved to the tail)"),
        (np.isposinf(lps).any(-1), LOGPROBS, "a +inf log-prob (read as padding)"),
        ((valid & (lps > LOGPROB_TOLERANCE)).any(-1), LOGPROBS,
         f"a log-prob above 0 (by more than the {LOGPROB_TOLERANCE} rounding tolerance)"),
        (mass > 1.0 + PROB_SUM_TOLERANCE, LOGPROBS,
         f"probabilities summing above 1 (+{PROB_SUM_TOLERANCE} rounding tolerance; they would be renormalised)"),
        ((valid & outside).any(-1), IDS, f"a token id {vocabulary}"),
        ((ordered[:, 1:] == ordered[:, :-1]).any(-1), IDS, "the same token id twice (its mass counted twice)"),
    ]
    bad = np.stack([hit for hit, _, _ in checks])  # (checks, positions)
    positions = np.flatnonzero(bad.any(0))
    if not positions.size:
        return None
    position = int(positions[0])
    _, field, what = checks[int(np.flatnonzero(bad[:, position])[0])]
    return TopKProblem(position, field, what)
