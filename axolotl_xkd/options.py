"""The values each loss option may take, and the one rule of which settings read the teacher.

Shared by the config schema (`args.py`) and the loss API (`losses/`), so neither restates the other. A leaf:
imports nothing, so the torch-free config layer and the torch-only loss layer can both use it.
"""

from __future__ import annotations

# D_i that compare two next-token distributions, and all of them (`sequence` is SeqKD's -log pi(a_i | s_i)).
TOKEN_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
DIVERGENCES = (*TOKEN_DIVERGENCES, "sequence")
Q_FORMS = ("logits", "logprobs", "ava")
TD_TARGETS = ("observed", "teacher_expected", "soft", "teacher_logprob")
# The TD targets built from the teacher's distribution.
TEACHER_TD_TARGETS = ("teacher_expected", "teacher_logprob")
# The TD targets built without the student's Q: the TD term then sends no gradient into the logits.
FIXED_TD_TARGETS = ("teacher_logprob",)
REWARD_INPUTS = ("next_state", "state")


def teacher_reader(*, divergence: str, alpha_kd: float, td_weight: float, td_target: str) -> str | None:
    """Which term reads the teacher's distribution (for error messages), or None when no term does."""
    if alpha_kd > 0 and divergence != "sequence":
        return f"divergence {divergence!r}"
    if td_weight > 0 and td_target in TEACHER_TD_TARGETS:
        return f"td_target {td_target!r}"
    return None


def reward_reaches_student(*, td_target: str, detach_backbone: bool) -> bool:
    """Whether the reward terms change the student's weights: through Q in TD_i (every target but the fixed ones,
    FIXED_TD_TARGETS) or through the reward head's input (unless its hidden states are detached)."""
    return td_target not in FIXED_TD_TARGETS or not detach_backbone
