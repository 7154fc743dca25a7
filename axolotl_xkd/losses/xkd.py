"""The X-KD loss of XKD_METHOD.md section 2, unchunked (the reference path of the trainer).

Per response token i (action a_i = u_{i+1} not masked):
    l_i = alpha_kd * D_i + alpha_ce * CE(z_i, a_i)
        + w_kl * KL(N(mu_i, sigma_i^2) || N(0, prior_std^2)) + lambda * (-log N(TD_i; mu_i, sigma_i^2))
`xkd_loss` returns the SUM over response tokens; the caller divides by the optimizer step's
token count (num_items_in_batch). Imports torch only; hyperparameters are plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from axolotl_xkd.losses.categories import paired_categories, teacher_expectation
from axolotl_xkd.losses.divergence import divergence
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.losses.signal import DenseSignal, TeacherSignal
from axolotl_xkd.losses.td import (
    gaussian_kl_to_prior,
    nonterminal_next,
    q_values,
    shift_targets,
    td_consistency,
    td_difference,
)


@dataclass(frozen=True)
class XKDHyperparams:
    """Loss hyperparameters, named as in XKD_METHOD.md; defaults are the spec's."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    skew_alpha: float = 0.1
    temperature: float = 1.0
    scale_by_tau_squared: bool = True
    alpha_kd: float = 1.0
    alpha_ce: float = 0.0
    reward_kl_weight: float = 1.0
    td_weight: float = 1.0
    gamma: float = 1.0
    prior_std: float = 1.0
    q_form: str = "ava"
    ava_alpha: float = 1.0
    td_target: str = "observed"
    reward_input: str = "next_state"
    topk_tail: bool = True
    ignore_index: int = -100

    @property
    def uses_reward(self) -> bool:
        """Whether the AVRIL terms (and so the reward head) enter the loss."""
        return self.reward_kl_weight > 0 or self.td_weight > 0

    @property
    def needs_teacher(self) -> bool:
        """Whether some term reads the teacher's distribution."""
        kd_needs = self.alpha_kd > 0 and self.divergence != "sequence"
        return kd_needs or (self.td_weight > 0 and self.td_target == "teacher_expected")


class XKDLossOutput(NamedTuple):
    """The loss SUM over response tokens, and detached per-term sums for logging."""

    loss: Tensor
    divergence: Tensor
    ce: Tensor
    kl_prior: Tensor
    td_nll: Tensor
    reward_mean: Tensor
    reward_std: Tensor
    num_tokens: Tensor


def align_reward(reward: Tensor, reward_input: str) -> Tensor:
    """Per-position head output (B, T) -> the value used for action a_i at position i.

    next_state reads R_i from h_{i+1} (the state a_i leads to); state reads it from h_i.
    """
    if reward_input == "state":
        return reward
    aligned = torch.zeros_like(reward)
    aligned[:, :-1] = reward[:, 1:]
    return aligned


def xkd_loss(
    student_logits: Tensor,
    labels: Tensor,
    *,
    teacher: TeacherSignal | None,
    reward_mean: Tensor | None,
    reward_log_std: Tensor | None,
    params: XKDHyperparams,
    position_ids: Tensor | None = None,
    eos_token_id: int | None = None,
) -> XKDLossOutput:
    """X-KD loss SUM over response tokens.

    student_logits (B, T, V); labels (B, T), unshifted, ignore_index where masked; teacher aligned
    with the student (position i predicts u_{i+1}); reward_mean / reward_log_std (B, T): the reward
    head applied to the student's last hidden state at every position; position_ids (B, T) marks
    packed segments (a reset to 0 starts a new sequence).
    """
    p = params
    targets = shift_targets(labels, position_ids, ignore_index=p.ignore_index)
    valid = targets != p.ignore_index
    safe_targets = torch.where(valid, targets, 0).unsqueeze(-1)
    logits = upcast(student_logits)
    student_logprobs = torch.log_softmax(logits / p.temperature, dim=-1)
    zero = logits.new_zeros(())

    def masked_sum(values: Tensor) -> Tensor:
        return torch.where(valid, values, 0.0).sum()

    total = zero
    div_sum = ce_sum = kl_sum = td_sum = mu_sum = std_sum = zero
    if p.alpha_kd > 0:
        if p.divergence == "sequence":
            per_token = -student_logprobs.gather(-1, safe_targets).squeeze(-1)
        else:
            if teacher is None:
                raise ValueError(f"divergence {p.divergence!r} needs a teacher signal")
            if isinstance(teacher, DenseSignal) and teacher.logits.shape != student_logits.shape:
                raise ValueError(
                    f"teacher logits {tuple(teacher.logits.shape)} do not match student logits "
                    f"{tuple(student_logits.shape)}; slice both to the shared tokenizer vocabulary"
                )
            s_cat, t_cat = paired_categories(
                student_logprobs, teacher, temperature=p.temperature, topk_tail=p.topk_tail
            )
            per_token = divergence(s_cat, t_cat, name=p.divergence, beta=p.beta, skew_alpha=p.skew_alpha)
            if p.scale_by_tau_squared:
                per_token = per_token * p.temperature**2
        div_sum = masked_sum(per_token)
        total = total + p.alpha_kd * div_sum
    if p.alpha_ce > 0:
        ce = F.cross_entropy(logits.flatten(0, 1), safe_targets.flatten(), reduction="none").view_as(targets)
        ce_sum = masked_sum(ce)
        total = total + p.alpha_ce * ce_sum
    if p.uses_reward:
        if reward_mean is None or reward_log_std is None:
            raise ValueError("reward_kl_weight or td_weight > 0 needs the reward head outputs")
        mu = align_reward(upcast(reward_mean), p.reward_input)
        log_std = align_reward(upcast(reward_log_std), p.reward_input)
        mu_sum, std_sum = masked_sum(mu).detach(), masked_sum(log_std.exp()).detach()
        if p.reward_kl_weight > 0:
            kl_sum = masked_sum(gaussian_kl_to_prior(mu, log_std, prior_std=p.prior_std))
            total = total + p.reward_kl_weight * kl_sum
        if p.td_weight > 0:
            q_table = q_values(logits, q_form=p.q_form, temperature=p.temperature, ava_alpha=p.ava_alpha)
            if p.td_target == "teacher_expected":
                if teacher is None:
                    raise ValueError("td_target 'teacher_expected' needs a teacher signal")
                q_taken = teacher_expectation(
                    q_table, student_logprobs, teacher, temperature=p.temperature, topk_tail=p.topk_tail
                )
            else:
                q_taken = q_table.gather(-1, safe_targets).squeeze(-1)
            nonterminal = nonterminal_next(targets, ignore_index=p.ignore_index, eos_token_id=eos_token_id)
            td = td_difference(q_taken, nonterminal, gamma=p.gamma)
            td_sum = masked_sum(td_consistency(td, mu, log_std))
            total = total + p.td_weight * td_sum
    return XKDLossOutput(
        loss=total,
        divergence=div_sum.detach(),
        ce=ce_sum.detach(),
        kl_prior=kl_sum.detach(),
        td_nll=td_sum.detach(),
        reward_mean=mu_sum,
        reward_std=std_sum,
        num_tokens=valid.sum(),
    )
