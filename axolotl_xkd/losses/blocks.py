"""Cache-sized blocks of rows of a (m, V) buffer, and the log-sum-exp taken block by block.

Full-vocabulary rows are wide (V up to ~256k): a pass over a block of about 2^20 float32 values (4 MB) keeps it
in cache, and a temporary of one block replaces a (m, V) copy. Imports torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from axolotl_xkd.losses.precision import upcast

# Elements per block of rows: 2^20 float32 values (4 MB) stay in cache across the passes over a block.
BLOCK_ELEMENTS = 2**20


def row_blocks(rows: int, vocab: int) -> list[slice]:
    """Slices of about BLOCK_ELEMENTS elements over the rows of a (rows, vocab) buffer."""
    step = max(1, BLOCK_ELEMENTS // max(vocab, 1))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def logsumexp_rows(values: Tensor, temperature: float = 1.0) -> Tensor:
    """logsumexp over the last dim of (m, V) / temperature, (m,), with cache-sized (block, V) temporaries."""
    return torch.cat([torch.logsumexp(upcast(values[b]) / temperature, dim=-1) for b in row_blocks(*values.shape)])
