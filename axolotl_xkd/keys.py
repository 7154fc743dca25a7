"""Every name axolotl_xkd adds to a batch or a dataset, in one place: the `xkd_` prefix, the columns of a
precomputed store and the keys the collator and the teacher sources put in a collated batch.

The trainer keeps a dataset's `xkd_` columns although the model's forward does not take them, and no model
input starts with the prefix. Imports nothing.
"""

from __future__ import annotations

PREFIX = "xkd_"
"""Every column and batch key below starts with it; `is_xkd_key` is how the trainer recognises them."""

# Dataset columns of a precomputed store (store/format.py describes the encodings).
TOPK_PACKED = PREFIX + "topk"  # packed_u32: one uint32 per entry, float16 -logprob bits and the token id
TOPK_IDS = PREFIX + "topk_ids"  # split: int32 token ids
TOPK_LOGPROBS = PREFIX + "topk_logprobs"  # split: float16 or float32 log-probs
TOPK_COLUMNS = (TOPK_PACKED, TOPK_IDS, TOPK_LOGPROBS)

# Batch keys.
TEACHER_IDS = PREFIX + "teacher_ids"  # (B, T, k) int64, the precomputed top-k expanded by the collator
TEACHER_LOGPROBS = PREFIX + "teacher_logprobs"  # (B, T, k) float32, -inf where a slot has no entry
TEACHER_TICKET = PREFIX + "teacher_ticket"  # int: the id of a batch's pending teacher-server requests
ROUTE = PREFIX + "route"  # (B, T) int64 under `mixture: route`: each token's teacher (index in xkd.teachers), -1 none


def is_xkd_key(name: str) -> bool:
    """True for a column or batch key this package added (not a model input)."""
    return name.startswith(PREFIX)
