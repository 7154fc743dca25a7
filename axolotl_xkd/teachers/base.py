"""The one protocol every teacher source follows."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from axolotl_xkd.losses.signal import TeacherSignal


class TeacherSource(Protocol):
    """Gives the teacher's next-token distribution for every position of a collated batch."""

    def get_signal(self, batch: dict[str, Tensor]) -> TeacherSignal:
        """Signal aligned with the student: position i is p_T(. | u_<=i)."""
        ...
