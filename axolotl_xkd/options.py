"""The values each loss option may take, their defaults and bounds, and the one rule of which settings read the
teacher.

Shared by the config schema (`args.py`) and the loss API (`losses/`), so neither restates the other: the `xkd:`
block and `XKDHyperparams` called from Python default to the same values and refuse the same ones. A leaf: imports
only the standard library, so the torch-free config layer and the torch-only loss layer can both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# D_i that compare two next-token distributions, and every value of xkd.divergence (`sequence` is SeqKD's
# -log pi(a_i | s_i), which reads no teacher distribution).
TOKEN_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
DIVERGENCES = (*TOKEN_DIVERGENCES, "sequence")
Q_FORMS = ("logits", "logprobs", "ava")
TD_TARGETS = ("observed", "teacher_expected", "soft", "teacher_logprob")
# The TD targets built from the teacher's distribution.
TEACHER_TD_TARGETS = ("teacher_expected", "teacher_logprob")
# The TD targets built without the student's Q: the TD term then sends no gradient into the logits.
FIXED_TD_TARGETS = ("teacher_logprob",)
REWARD_INPUTS = ("next_state", "state")
# The loss's options that take one of a few values, by key.
LOSS_CHOICES = {"divergence": DIVERGENCES, "q_form": Q_FORMS, "td_target": TD_TARGETS, "reward_input": REWARD_INPUTS}


def teacher_reader(*, divergence: str, alpha_kd: float, td_weight: float, td_target: str) -> str | None:
    """Which term reads the teacher's distribution (for error messages), or None when no term does."""
    if alpha_kd > 0 and divergence != "sequence":
        return f"divergence {divergence!r}"
    if td_weight > 0 and td_target in TEACHER_TD_TARGETS:
        return f"td_target {td_target!r}"
    return None


@dataclass(frozen=True)
class Interval:
    """The values a numeric option may take: low to high, each end open or closed."""

    low: float
    low_inclusive: bool = True
    high: float = math.inf
    high_inclusive: bool = False

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below  # False for NaN

    def __str__(self) -> str:
        return f"{'[' if self.low_inclusive else '('}{self.low}, {self.high}{']' if self.high_inclusive else ')'}"

    def pydantic(self) -> dict[str, float]:
        """The bounds as pydantic Field keywords (ge/gt, le/lt)."""
        bounds = {"ge" if self.low_inclusive else "gt": self.low}
        if self.high != math.inf:
            bounds["le" if self.high_inclusive else "lt"] = self.high
        return bounds


# The loss's numeric hyperparameters, each as xkd.<name> accepts it.
LOSS_BOUNDS: dict[str, Interval] = {
    "beta": Interval(0, True, 1, True),
    "skew_alpha": Interval(0, True, 1, False),
    "temperature": Interval(0, False),
    "alpha_kd": Interval(0),
    "alpha_ce": Interval(0),
    "reward_kl_weight": Interval(0),
    "td_weight": Interval(0),
    "gamma": Interval(0, True, 1, True),
    "prior_std": Interval(0, False),
    "ava_alpha": Interval(0, False),
}

# The loss's defaults, the `xkd:` block's and XKDHyperparams' alike: the spec's, except where the quality study
# recommends otherwise (docs/defaults.md): the reward head fits the teacher's per-token log-prob (a fixed target,
# so with a detached head the student trains exactly as GKD's does), with w_kl = lambda = 0.1.
LOSS_DEFAULTS: dict[str, object] = {
    "divergence": "forward_kl",
    "beta": 0.5,
    "skew_alpha": 0.1,
    "temperature": 1.0,
    "scale_by_tau_squared": True,
    "alpha_kd": 1.0,
    "alpha_ce": 0.0,
    "reward_kl_weight": 0.1,
    "td_weight": 0.1,
    "gamma": 1.0,
    "prior_std": 1.0,
    "q_form": "ava",
    "ava_alpha": 1.0,
    "td_target": "teacher_logprob",
    "reward_input": "next_state",
    "topk_tail": True,
}

# Positions per chunk of the fused, chunked loss (xkd.chunk_size).
DEFAULT_CHUNK_SIZE = 1024
# Names of the floating-point dtypes a teacher or scorer may be loaded in (torch.<name>).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
MIXTURES = ("route", "weighted", "confidence")
"""How several teachers combine (`xkd.mixture`, teachers/mixture.py)."""
CONFIDENCE_SCORES = ("logprob", "neg_entropy")
"""A teacher's score at a position under `mixture: confidence`."""
ENTRY_TEACHER = "xkd_teacher"
"""The key of an Axolotl `datasets:` entry that routes all of its rows to one teacher (`xkd.mixture: route`)."""

# What best-of-n reranking sorts by (`axolotl xkd score --rank-by`) -> the ScoredResponse field: the learned reward
# summed or averaged over the response, or the student's own log-likelihood, which the reranking benchmark
# (docs/reward.md) found the better pick.
RANK_FIELDS: dict[str, str] = {"logprob": "logprob_sum", "sum": "reward_sum", "mean": "reward_mean"}

# The spec's coupled form (XKD_METHOD.md section 2): TD_i built from the student's Q at the observed tokens and the
# reward head's gradient into the student's body, so the reward terms pull on the student. Its one home: the preset
# below and every benchmark arm that trains the coupled form add their weights to it.
COUPLED_FORM: dict[str, object] = {"td_target": "observed", "reward_detach_backbone": False}

# `xkd.preset`: settings that take several keys, by name. Keys set beside the preset win over its values.
PRESETS: dict[str, dict[str, object]] = {
    # The coupled form at the weights the quality study's dev sweep chose (lambda / w_kl = 0.5 at w_kl = 1: the
    # highest worst ratio to GKD over four tasks and four divergences; docs/defaults.md).
    "coupled": {**COUPLED_FORM, "td_weight": 0.5, "reward_kl_weight": 1.0},
}



def reward_reaches_student(*, td_target: str, detach_backbone: bool) -> bool:
    """Whether the reward terms change the student's weights: through Q in TD_i (every target but the fixed ones,
    FIXED_TD_TARGETS) or through the reward head's input (unless its hidden states are detached)."""
    return td_target not in FIXED_TD_TARGETS or not detach_backbone
