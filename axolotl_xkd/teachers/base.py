"""The one contract every teacher source follows: the base class the trainer calls, with each optional
capability declared here and a default that means "not supported" (or "nothing to do").

Imports torch and the loss's signal types only.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from axolotl_xkd.losses.signal import DenseHiddenSignal, TeacherSignal


class TeacherSource:
    """Gives the teacher's next-token distribution for every position of a collated batch.

    Subclasses implement `get_signal`; the other members are capabilities a source may add:
    - `fusable` / `get_hidden_signal`: the teacher's hidden states and output layer, so the chunked loss forms
      the teacher's logits a chunk at a time (the in-process model with a plain Linear output layer);
    - `prefetched` / `submit`: ask a remote teacher ahead of the step that needs the answer (the server);
    - `metrics`: statistics to log (a mixture's per-teacher shares and weights).
    """

    def get_signal(self, batch: dict[str, Tensor]) -> TeacherSignal:
        """Signal aligned with the student: position i is p_T(. | u_<=i)."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_signal")

    @property
    def fusable(self) -> bool:
        """Whether `get_hidden_signal` is available; only then may the trainer call it."""
        return False

    def get_hidden_signal(self, batch: dict[str, Tensor]) -> DenseHiddenSignal:
        """Teacher last hidden states and output layer for the chunked loss (sources with `fusable`)."""
        raise NotImplementedError(f"{type(self).__name__} is not fusable; call get_signal")

    def prefetched(self, batches: Iterator[dict]) -> Iterator[dict]:
        """The trainer's batch iterator, wrapped to start each batch's teacher work early; by default as it is."""
        return batches

    def submit(self, batch: dict[str, Tensor]) -> None:
        """Start the teacher's work for `batch` before `get_signal` asks for it; by default nothing to start."""

    def metrics(self) -> dict[str, float]:
        """The source's statistics since the last call (logged under xkd/ at each log step); by default none."""
        return {}
