"""AVRIL pieces of X-KD (XKD_METHOD.md section 2): Q values, terminal states, TD differences and
the Gaussian reward posterior's KL-to-prior and negative log-likelihood. Imports torch only."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from axolotl_xkd.losses.precision import upcast

Q_FORMS = ("logits", "logprobs", "ava")
_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


def q_values(student_logits: Tensor, *, q_form: str, temperature: float, ava_alpha: float = 1.0) -> Tensor:
    """Q(s_i, .) for every token, (B, T, V) -> (B, T, V), at least float32.

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


def shift_targets(labels: Tensor, position_ids: Tensor | None, *, ignore_index: int = -100) -> Tensor:
    """Action a_i = u_{i+1} at position i, (B, T); ignore_index where there is no action.

    The last position has none, and in packed rows neither has the last token of a segment:
    its next token starts another sequence (position_ids resets to 0 there).
    """
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        crosses = torch.zeros_like(labels, dtype=torch.bool)
        crosses[:, :-1] = position_ids[:, 1:] == 0
        targets = targets.masked_fill(crosses, ignore_index)
    return targets


def nonterminal_next(targets: Tensor, *, ignore_index: int = -100, eos_token_id: int | None = None) -> Tensor:
    """(B, T) bool: True where s'_i is not terminal, so TD_i includes gamma * Q(s'_i, a'_i).

    s'_i is terminal when a_i is EOS, or when position i+1 has no unmasked action (a masked label,
    the end of the row, or the end of a packed segment, all already ignore_index in `targets`).
    """
    has_next = torch.zeros_like(targets, dtype=torch.bool)
    has_next[:, :-1] = targets[:, 1:] != ignore_index
    if eos_token_id is not None:
        has_next &= targets != eos_token_id
    return has_next


def td_difference(q_taken: Tensor, nonterminal: Tensor, *, gamma: float) -> Tensor:
    """TD_i = Q(s_i, a_i) - gamma * Q(s'_i, a'_i), the second term 0 at terminal s'_i.

    q_taken (B, T) holds Q(s_i, a_i) at every position; Q(s'_i, a'_i) is its value at i+1.
    """
    q_next = torch.zeros_like(q_taken)
    q_next[:, :-1] = q_taken[:, 1:]
    return q_taken - gamma * torch.where(nonterminal, q_next, 0.0)


def gaussian_kl_to_prior(mean: Tensor, log_std: Tensor, *, prior_std: float = 1.0) -> Tensor:
    """KL( N(mean, std^2) || N(0, prior_std^2) ), elementwise."""
    variance_ratio = torch.exp(2.0 * log_std) / prior_std**2
    return 0.5 * (variance_ratio + mean.square() / prior_std**2 - 1.0) - log_std + math.log(prior_std)


def td_consistency(td: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """-log N(TD_i ; mean, std^2), elementwise: the reward-consistency term of AVRIL."""
    return _HALF_LOG_TWO_PI + log_std + 0.5 * ((td - mean) * torch.exp(-log_std)).square()
