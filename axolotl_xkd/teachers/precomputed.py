"""The precomputed teacher (`xkd.teacher.source: precomputed`): top-k log-probs stored with the data.

A thin adapter over the store (axolotl_xkd.store): its collator has already expanded each row's stored top-k
to the batch's positions; this source checks the shapes and hands them to the loss. Imports torch only.
"""

from __future__ import annotations

from torch import Tensor

from axolotl_xkd.keys import TEACHER_IDS, TEACHER_LOGPROBS
from axolotl_xkd.losses.signal import TopKSignal
from axolotl_xkd.teachers.base import TeacherSource


class PrecomputedTeacherSource(TeacherSource):
    """Reads the teacher's top-k (B, T, k) from the collated batch; position i is p_T(. | u_<=i)."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k

    def get_signal(self, batch: dict[str, Tensor]) -> TopKSignal:
        """TopKSignal aligned with the student's logits; -inf log-probs mark slots without an entry."""
        if TEACHER_IDS not in batch or TEACHER_LOGPROBS not in batch:
            raise KeyError(
                f"the batch has no {TEACHER_IDS!r}/{TEACHER_LOGPROBS!r}: xkd.teacher.source is 'precomputed' but the "
                "batch was not built by axolotl_xkd's top-k collator (is another plugin replacing the collator?)"
            )
        ids, logprobs = batch[TEACHER_IDS], batch[TEACHER_LOGPROBS]
        expected = (*batch["input_ids"].shape, self.top_k)
        if tuple(ids.shape) != expected or tuple(logprobs.shape) != expected:
            raise ValueError(
                f"teacher top-k shapes {tuple(ids.shape)} / {tuple(logprobs.shape)} do not match the batch's "
                f"input_ids {tuple(batch['input_ids'].shape)} with k={self.top_k}"
            )
        return TopKSignal(token_ids=ids, logprobs=logprobs)
