"""The one contract every teacher source follows: the base class the trainer calls, with each optional
capability declared here and a default that means "not supported" (or "nothing to do").

Imports torch and the loss's signal types only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import Tensor

from axolotl_xkd.losses.mixed import MixedSignal
from axolotl_xkd.losses.signal import DenseHiddenSignal, TeacherSignal

if TYPE_CHECKING:
    from axolotl_xkd.cross_tokenizer import Aligner


class TeacherSource:
    """Gives the teacher's next-token distribution for every position of a collated batch.

    Subclasses implement `get_signal`; the other members are capabilities a source may add:
    - `fusable` / `get_hidden_signal`: the teacher's hidden states and output layer, so the chunked loss forms
      the teacher's logits a chunk at a time (the in-process model with a plain Linear output layer);
    - `prefetched` / `submit`: ask a remote teacher ahead of the step that needs the answer (the server);
    - `metrics`: statistics to log (a mixture's per-teacher shares and weights);
    - `record_width` / `aligner`: what a store records of the teacher (`axolotl xkd precompute`, a writer over any
      source): the slots of its top-k records and, for a teacher of another tokenizer, its alignment;
    - `close`: release what the source holds outside this process.
    """

    aligner: Aligner | None = None
    """A teacher of another tokenizer: its alignment with the student's (a store records the teacher's tokenizer and
    the vocabulary map's digest); None for a teacher of the student's tokenizer."""

    def get_signal(self, batch: dict[str, Tensor]) -> TeacherSignal:
        """Signal aligned with the student: position i is p_T(. | u_<=i)."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_signal")

    @property
    def fusable(self) -> bool:
        """Whether `get_hidden_signal` is available; only then may the trainer call it."""
        return False

    def get_hidden_signal(self, batch: dict[str, Tensor]) -> DenseHiddenSignal | MixedSignal:
        """Teacher last hidden states and output layer for the chunked loss (sources with `fusable`); a mixture's
        teachers unmixed, with their weights."""
        raise NotImplementedError(f"{type(self).__name__} is not fusable; call get_signal")

    def prefetched(self, batches: Iterator[dict]) -> Iterator[dict]:
        """The trainer's batch iterator, wrapped to start each batch's teacher work early; by default as it is."""
        return batches

    def submit(self, batch: dict[str, Tensor]) -> None:
        """Start the teacher's work for `batch` before `get_signal` asks for it; by default nothing to start."""

    def close(self) -> None:
        """Release what the source holds outside this process (a server's queued requests); by default nothing."""

    def record_width(self, top_k: int) -> int:
        """Slots of each position's record when the signal is kept as top-k records of `top_k` tokens: `top_k` for a
        full-vocabulary teacher (its k most likely tokens); a source whose signal is already a record of its own
        width (a server, a teacher of another tokenizer) returns that width."""
        return top_k

    def metrics(self) -> dict[str, float]:
        """The source's statistics since the last call (logged under xkd/ at each log step); by default none."""
        return {}
