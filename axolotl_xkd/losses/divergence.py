"""Per-token divergences between the teacher p_T and the student pi (XKD_METHOD.md section 2).

Every function takes log-probabilities over the same categories, (..., C), and returns (...,).
The categories are either the full vocabulary or the k+1 "top-k plus tail" categories of
section 3; entries of -inf (zero probability) are handled without NaN values or gradients.
Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.options import TOKEN_DIVERGENCES


def kl(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c); categories with p_c = 0 contribute 0.

    Clamped at 0: p and q each normalised with their own rounding (float32 log_softmax, the tail category, a JSD
    mixture's logaddexp) make the sum of near-equal distributions come out a few 1e-7 below 0 (docs/precision.md).
    """
    p = p_logprobs.exp()
    # The double where keeps (-inf) - (-inf) out of both the value and the gradient.
    diff = torch.where(p > 0, p_logprobs - torch.where(p > 0, q_logprobs, 0.0), 0.0)
    return (p * diff).sum(-1).clamp(min=0.0)


def log_mixture(a_logprobs: Tensor, b_logprobs: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), with finite gradients where both are -inf."""
    both_zero = torch.isneginf(a_logprobs) & torch.isneginf(b_logprobs)
    a = torch.where(both_zero, 0.0, a_logprobs) + math.log(weight_a) if weight_a > 0 else None
    b = torch.where(both_zero, 0.0, b_logprobs) + math.log(1.0 - weight_a) if weight_a < 1 else None
    if a is None:
        mixed = b
    elif b is None:
        mixed = a
    else:
        mixed = torch.logaddexp(a, b)
    return torch.where(both_zero, -math.inf, mixed)


def forward_kl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """KL(p_T || pi): mass-covering."""
    return kl(teacher_logprobs, student_logprobs)


def reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """KL(pi || p_T): mode-seeking."""
    return kl(student_logprobs, teacher_logprobs)


def generalized_jsd(student_logprobs: Tensor, teacher_logprobs: Tensor, *, beta: float) -> Tensor:
    """beta * KL(p_T || m) + (1 - beta) * KL(pi || m), m = beta * p_T + (1 - beta) * pi.

    TRL GKD convention at the ends: beta = 0 is KL(p_T || pi), beta = 1 is KL(pi || p_T).
    """
    if beta == 0.0:
        return forward_kl(student_logprobs, teacher_logprobs)
    if beta == 1.0:
        return reverse_kl(student_logprobs, teacher_logprobs)
    mixture = log_mixture(teacher_logprobs, student_logprobs, beta)
    return beta * kl(teacher_logprobs, mixture) + (1.0 - beta) * kl(student_logprobs, mixture)


def skew_forward_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, *, skew_alpha: float) -> Tensor:
    """DistiLLM skew KL: KL(p_T || skew_alpha * p_T + (1 - skew_alpha) * pi)."""
    return kl(teacher_logprobs, log_mixture(teacher_logprobs, student_logprobs, skew_alpha))


def skew_reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, *, skew_alpha: float) -> Tensor:
    """DistiLLM skew reverse KL: KL(pi || skew_alpha * pi + (1 - skew_alpha) * p_T)."""
    return kl(student_logprobs, log_mixture(student_logprobs, teacher_logprobs, skew_alpha))


def total_variation(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """0.5 * sum |p_T - pi|."""
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


# name -> (per-token function, the hyperparameters it takes by name): one entry per value of TOKEN_DIVERGENCES, so
# a new divergence is one function plus its option (tests/unit/test_options.py checks the two lists agree).
REGISTRY: dict[str, tuple[Callable[..., Tensor], tuple[str, ...]]] = {
    "forward_kl": (forward_kl, ()),
    "reverse_kl": (reverse_kl, ()),
    "jsd": (generalized_jsd, ("beta",)),
    "skew_forward_kl": (skew_forward_kl, ("skew_alpha",)),
    "skew_reverse_kl": (skew_reverse_kl, ("skew_alpha",)),
    "tvd": (total_variation, ()),
}


def divergence(student_logprobs: Tensor, teacher_logprobs: Tensor, *, name: str, **hyperparams: float) -> Tensor:
    """The divergence D_i called `name` (one of TOKEN_DIVERGENCES), per token; `hyperparams` may hold more than
    it takes (beta, skew_alpha): each function gets the ones it names in REGISTRY. Half-precision log-probs are
    computed in float32 (precision.upcast)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown divergence {name!r}; expected one of {TOKEN_DIVERGENCES} or 'sequence'")
    function, takes = REGISTRY[name]
    return function(upcast(student_logprobs), upcast(teacher_logprobs), **{key: hyperparams[key] for key in takes})
