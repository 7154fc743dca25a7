"""AVRIL pieces of X-KD (XKD_METHOD.md section 2): Q values, TD differences and the Gaussian reward
posterior's KL-to-prior and negative log-likelihood. Imports torch only."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.options import Q_FORMS

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


def q_values(student_logits: Tensor, *, q_form: str, temperature: float, ava_alpha: float = 1.0) -> Tensor:
    """Q(s_i, .) for every token, (..., V) -> (..., V), at least float32.

    logits: z_i / tau (AVRIL's Boltzmann Q-network); logprobs: log_softmax(z_i / tau);
    ava: log_softmax(ava_alpha * softmax(z_i / tau)) (AVA, arXiv 2411.09341).
    """
    scaled = upcast(student_logits) / temperature
    if q_form == "logits":
        return scaled
    if q_form == "logprobs":
        return torch.log_softmax(scaled, dim=-1)
    if q_form == "ava":
        return torch.log_softmax(ava_alpha * torch.softmax(scaled, dim=-1), dim=-1)
    raise ValueError(f"unknown q_form {q_form!r}; expected one of {Q_FORMS}")


def soft_value(student_logits: Tensor, *, q_form: str, temperature: float) -> Tensor:
    """V(s_i) = logsumexp_a Q(s_i, a), (..., V) -> (...,): the soft value of the Boltzmann policy softmax(Q).

    For q_form logits it is logsumexp(z_i / tau); the normalised forms (logprobs, ava) have V = 0 exactly,
    returned as zeros rather than a rounded logsumexp of a log_softmax (no spurious gradient).
    """
    if q_form not in Q_FORMS:
        raise ValueError(f"unknown q_form {q_form!r}; expected one of {Q_FORMS}")
    scaled = upcast(student_logits) / temperature
    if q_form == "logits":
        return torch.logsumexp(scaled, dim=-1)
    return scaled.new_zeros(scaled.shape[:-1])


def td_difference(q_taken: Tensor, nonterminal: Tensor, *, gamma: float, next_value: Tensor | None = None) -> Tensor:
    """TD_i = Q(s_i, a_i) - gamma * X_{i+1} over flat positions (N,), the second term 0 at terminal s'_i.

    q_taken holds Q(s_i, a_i) at every position; X is `next_value` (td_target soft: V(s_i)) or, by default,
    q_taken itself (Q(s'_i, a'_i)), read at i+1. The last position of every row and packed segment is
    terminal, so no pair crosses a row once (B, T) is flattened.
    """
    value = q_taken if next_value is None else next_value
    later = torch.zeros_like(value)
    later[:-1] = value[1:]
    return q_taken - gamma * torch.where(nonterminal, later, 0.0)


def gaussian_kl_to_prior(mu: Tensor, log_sigma: Tensor, *, prior_std: float = 1.0) -> Tensor:
    """KL( N(mu, sigma^2) || N(0, prior_std^2) ), elementwise, as 0.5 (r - 1 - log r + mu^2 / prior_std^2) with
    r = sigma^2 / prior_std^2: r - 1 - log r cancels near sigma = prior_std, where expm1 keeps it at 0 or above (the
    direct form came out -3e-8 in float32 there)."""
    log_ratio = 2.0 * (log_sigma - math.log(prior_std))
    return 0.5 * (torch.expm1(log_ratio) - log_ratio + mu.square() / prior_std**2)


def td_consistency(td: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    """-log N(TD_i ; mu, sigma^2), elementwise: the reward-consistency term of AVRIL."""
    return _HALF_LOG_TWO_PI + log_sigma + 0.5 * ((td - mu) * torch.exp(-log_sigma)).square()
