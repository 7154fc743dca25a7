"""The X-KD loss of XKD_METHOD.md section 2: its hyperparameters, its per-token terms and `xkd_loss`.

Per response token i (action a_i = u_{i+1} not masked):
    l_i = alpha_kd * D_i + alpha_ce * CE(z_i, a_i)
        + w_kl * KL(N(mu_i, sigma_i^2) || N(0, prior_std^2)) + lambda * (-log N(TD_i; mu_i, sigma_i^2))
`token_terms` writes the logit terms (D_i, CE, TD) once, over flat rows; `xkd_loss` calls it on all rows
and chunked.py a chunk of rows at a time. The loss is the SUM over response tokens; the caller divides by
the optimizer step's token count (num_items_in_batch). Imports torch only; hyperparameters are plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from axolotl_xkd.losses.categories import paired_categories, teacher_expectation, teacher_token_logprob
from axolotl_xkd.losses.divergence import divergence
from axolotl_xkd.losses.positions import IGNORE_INDEX, align_reward, nonterminal_next, shift_targets
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.losses.signal import DenseHiddenSignal, TeacherSignal
from axolotl_xkd.losses.td import (
    gaussian_kl_to_prior,
    q_values,
    soft_value,
    td_consistency,
    td_difference,
)
from axolotl_xkd.options import FIXED_TD_TARGETS, LOSS_BOUNDS, LOSS_CHOICES, LOSS_DEFAULTS, teacher_reader

_D = LOSS_DEFAULTS


@dataclass(frozen=True)
class XKDHyperparams:
    """Loss hyperparameters, named as in XKD_METHOD.md; defaults and bounds are the `xkd:` block's (options.py).

    Validated on construction, so the loss API called directly rejects what the config rejects (an unknown q_form,
    tau <= 0, ...) instead of computing something else, and trains as `axolotl train` does with the same keys.
    """

    divergence: str = _D["divergence"]
    beta: float = _D["beta"]
    skew_alpha: float = _D["skew_alpha"]
    temperature: float = _D["temperature"]
    scale_by_tau_squared: bool = _D["scale_by_tau_squared"]
    alpha_kd: float = _D["alpha_kd"]
    alpha_ce: float = _D["alpha_ce"]
    reward_kl_weight: float = _D["reward_kl_weight"]
    td_weight: float = _D["td_weight"]
    gamma: float = _D["gamma"]
    prior_std: float = _D["prior_std"]
    q_form: str = _D["q_form"]
    ava_alpha: float = _D["ava_alpha"]
    td_target: str = _D["td_target"]
    reward_input: str = _D["reward_input"]
    topk_tail: bool = _D["topk_tail"]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        for name, choices in LOSS_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices} (xkd.{name})")
        for name, interval in LOSS_BOUNDS.items():
            value = getattr(self, name)
            if value not in interval:
                raise ValueError(f"{name}={value!r} is outside {interval} (xkd.{name}); pass a value in it")

    @property
    def uses_reward(self) -> bool:
        """Whether the AVRIL terms (and so the reward head) enter the loss."""
        return self.reward_kl_weight > 0 or self.td_weight > 0

    @property
    def uses_td(self) -> bool:
        """Whether the TD-consistency term lambda * (-log N(TD_i; mu_i, sigma_i^2)) enters the loss."""
        return self.td_weight > 0

    @property
    def fixed_td_target(self) -> bool:
        """Whether TD_i is built without the student's Q (no TD gradient into the logits, no look-ahead row)."""
        return self.td_target in FIXED_TD_TARGETS

    @property
    def needs_teacher(self) -> bool:
        """Whether some term reads the teacher's distribution."""
        return teacher_reader(divergence=self.divergence, alpha_kd=self.alpha_kd, td_weight=self.td_weight,
                              td_target=self.td_target) is not None


class XKDLossOutput(NamedTuple):
    """The loss SUM over response tokens, and detached per-term sums for logging."""

    loss: Tensor
    divergence: Tensor
    ce: Tensor
    kl_prior: Tensor
    td_nll: Tensor
    mu_sum: Tensor
    sigma_sum: Tensor
    num_tokens: Tensor
    # With forces=True: (sum ||d(alpha_kd D)/dz_i||, sum ||d(lambda TD-NLL)/dz_i||, rows) over the rows measured
    # (term_forces); None otherwise.
    forces: Tensor | None = None


class Positions(NamedTuple):
    """Per-position tensors of a batch flattened (B, T) -> (N,): after the terminal flags are set on (B, T),
    the last position of every row is terminal, so flat neighbours never pair across rows."""

    targets: Tensor  # a_i, or ignore_index where position i has no action
    valid: Tensor  # bool, True at response positions: the ones the loss counts
    nonterminal: Tensor | None  # bool, s'_i not terminal; None without the TD term
    mu: Tensor | None  # reward-head mean aligned with a_i (reward_input), at least float32; None without reward
    log_sigma: Tensor | None


class RowInputs(NamedTuple):
    """What the logit terms read over m flat rows besides the differentiable logits, mu and log_sigma.

    valid (n,) with n = m or n = m - 1: rows [0, n) are counted, row n (when present) is a chunk's look-ahead
    row whose Q value TD_{n-1} needs. The other fields cover all m rows.
    """

    teacher: TeacherSignal | None
    targets: Tensor
    valid: Tensor
    nonterminal: Tensor | None  # None: no TD term


def check_inputs(params: XKDHyperparams, teacher: object | None, mu: Tensor | None,
                 log_sigma: Tensor | None) -> None:
    """Raise if a term the hyperparameters switch on lacks its input."""
    p = params
    if teacher is None and p.alpha_kd > 0 and p.divergence != "sequence":
        raise ValueError(f"divergence {p.divergence!r} needs a teacher signal")
    if teacher is None and p.needs_teacher:
        raise ValueError(f"td_target {p.td_target!r} needs a teacher signal")
    if p.uses_reward and (mu is None or log_sigma is None):
        raise ValueError("reward_kl_weight or td_weight > 0 needs the reward head outputs")


def flat_positions(labels: Tensor, mu: Tensor | None, log_sigma: Tensor | None, *,
                   params: XKDHyperparams, position_ids: Tensor | None, eos_token_id: int | None) -> Positions:
    """Actions, response mask, terminal flags and aligned reward of a (B, T) batch, as flat (N,) tensors."""
    p, n_rows = params, labels.numel()
    targets = shift_targets(labels, position_ids, ignore_index=p.ignore_index)
    nonterminal = None
    if p.uses_td:
        nonterminal = nonterminal_next(targets, ignore_index=p.ignore_index, eos_token_id=eos_token_id)
        nonterminal = nonterminal.reshape(n_rows)
    mu_i = log_sigma_i = None
    if p.uses_reward:
        mu_i = align_reward(upcast(mu), p.reward_input).reshape(n_rows)
        log_sigma_i = align_reward(upcast(log_sigma), p.reward_input).reshape(n_rows)
    targets = targets.reshape(n_rows)
    return Positions(targets, targets != p.ignore_index, nonterminal, mu_i, log_sigma_i)


def flat_teacher(teacher: TeacherSignal | DenseHiddenSignal, positions: torch.Size, vocab_size: int
                 ) -> TeacherSignal | DenseHiddenSignal:
    """The teacher, aligned with the (B, T) `positions`, flattened to (N, ...); a dense teacher must cover exactly
    `vocab_size` tokens.

    Why raise rather than cut a wider teacher: the categories of D_i are the shared tokens, and which of
    the teacher's extra entries are padding only the caller knows (the trainer cuts both to the tokenizer
    length); renormalising over a silently cut vocabulary would change p_T.
    """
    if teacher.positions != positions:
        raise ValueError(f"the teacher's {tuple(teacher.positions)} positions are not aligned with the student's "
                         f"(B, T) = {tuple(positions)}: position i of the teacher must predict the same token as z_i")
    if teacher.vocab_size is not None and teacher.vocab_size != vocab_size:
        raise ValueError(
            f"the teacher's distributions cover {teacher.vocab_size} tokens but the student's vocabulary has "
            f"{vocab_size}. X-KD compares full next-token distributions over the same tokens, so they must match: "
            "slice both to the shared tokenizer vocabulary (chunked_xkd_loss: pass vocab_size=<tokenizer length>), "
            "or use a top-k teacher."
        )
    return teacher.flat()


def prepare(labels: Tensor, teacher: TeacherSignal | DenseHiddenSignal | None, mu: Tensor | None,
            log_sigma: Tensor | None, *, params: XKDHyperparams, vocab_size: int, position_ids: Tensor | None,
            eos_token_id: int | None) -> tuple[Positions, TeacherSignal | DenseHiddenSignal | None]:
    """Checked inputs of both loss paths: the flat positions and the flat teacher (None where no term reads it)."""
    check_inputs(params, teacher, mu, log_sigma)
    positions = flat_positions(labels, mu, log_sigma, params=params, position_ids=position_ids,
                               eos_token_id=eos_token_id)
    return positions, flat_teacher(teacher, labels.shape, vocab_size) if params.needs_teacher else None


def token_terms(logits: Tensor, mu: Tensor | None, log_sigma: Tensor | None, rows: RowInputs, *,
                params: XKDHyperparams) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Weighted sum of the logit terms alpha_kd * D_i + alpha_ce * CE_i + lambda * TD-NLL_i over the counted
    rows, and their unweighted (D, CE, TD-NLL) sums, detached.

    logits (m, V) at least float32; mu and log_sigma (n,) the aligned reward-head outputs of the counted rows.
    """
    p = params
    teacher, targets, valid, nonterminal = rows
    n = valid.shape[0]
    safe_targets = torch.where(targets != p.ignore_index, targets, 0).unsqueeze(-1)
    logprobs = torch.log_softmax(logits / p.temperature, dim=-1)
    zero = logits.new_zeros(())

    def masked_sum(values: Tensor) -> Tensor:
        return torch.where(valid, values, 0.0).sum()

    div_sum = ce_sum = td_sum = zero
    if p.alpha_kd > 0:
        if p.divergence == "sequence":
            per_token = -logprobs[:n].gather(-1, safe_targets[:n]).squeeze(-1)
        else:
            s_cat, t_cat = paired_categories(
                logprobs[:n], teacher.rows(slice(0, n)), temperature=p.temperature, topk_tail=p.topk_tail
            )
            per_token = divergence(s_cat, t_cat, name=p.divergence, beta=p.beta, skew_alpha=p.skew_alpha)
            if p.scale_by_tau_squared:
                per_token = per_token * p.temperature**2
        div_sum = masked_sum(per_token)
    if p.alpha_ce > 0:
        ce_sum = masked_sum(F.cross_entropy(logits[:n], safe_targets[:n, 0], reduction="none"))
    if nonterminal is not None:
        td = td_per_row(logits, logprobs, safe_targets[:, 0], nonterminal, teacher, params=p)[:n]
        td_sum = masked_sum(td_consistency(td, mu, log_sigma))
    loss = p.alpha_kd * div_sum + p.alpha_ce * ce_sum + p.td_weight * td_sum
    return loss, (div_sum.detach(), ce_sum.detach(), td_sum.detach())


def _row_pulls(logits: Tensor, mu: Tensor | None, log_sigma: Tensor | None, rows: RowInputs,
               params: XKDHyperparams) -> Tensor:
    """Per-row norm of d(token_terms under `params`)/dz over the counted rows (a look-ahead row excluded)."""
    z = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, _ = token_terms(z, mu, log_sigma, rows, params=params)
        (grad,) = torch.autograd.grad(loss, z, allow_unused=True)
    n = rows.valid.shape[0]
    if grad is None:
        return z.new_zeros(n)
    return torch.where(rows.valid, grad[:n].norm(dim=-1), 0.0)


def term_forces(logits: Tensor, mu: Tensor | None, log_sigma: Tensor | None, rows: RowInputs, *,
                params: XKDHyperparams) -> Tensor:
    """How hard the distillation and the TD term pull on the student: (sum_i ||d(alpha_kd D_i)/dz_i||,
    sum_i ||d(lambda TD-NLL)/dz_i||, counted rows) over these rows, by autograd through token_terms with one term on
    at a time; nothing reaches the inputs' gradients.

    docs/defaults.md derives that with the coupled form (TD_i built from the student's Q) the TD term's pull does
    not fade at lambda = w_kl while a bounded divergence's does; the trainer logs the means as xkd/kd_force and
    xkd/td_force. The TD gradient at row i holds TD_i's pull on Q(s_i, a_i) and TD_{i-1}'s on Q(s'_{i-1}, a'_{i-1}),
    so a chunk's look-ahead row must be present, as the loss has it. A fixed TD target sends nothing into the
    logits: its norm is 0.
    """
    mu = None if mu is None else mu.detach()
    log_sigma = None if log_sigma is None else log_sigma.detach()
    zeros = logits.new_zeros(rows.valid.shape[0])
    kd, td = zeros, zeros
    if params.alpha_kd > 0:
        kd = _row_pulls(logits, mu, log_sigma, rows._replace(nonterminal=None),
                        replace(params, alpha_ce=0.0, td_weight=0.0))
    if rows.nonterminal is not None and params.td_weight > 0 and not params.fixed_td_target:
        td = _row_pulls(logits, mu, log_sigma, rows, replace(params, alpha_kd=0.0, alpha_ce=0.0))
    return torch.stack([kd.sum(), td.sum(), rows.valid.sum().to(zeros.dtype)])


def td_per_row(logits: Tensor, logprobs: Tensor, actions: Tensor, nonterminal: Tensor, teacher: TeacherSignal | None,
               *, params: XKDHyperparams) -> Tensor:
    """TD_i of every row, (m,), by td_target (XKD_METHOD.md section 2); actions (m,) in the vocabulary.

    observed / teacher_expected: Q(s_i, a_i) - gamma Q(s'_i, a'_i); soft: Q(s_i, a_i) - gamma V(s'_i), both
    terms carrying gradient (AVRIL's convention for the TD difference); teacher_logprob: log p_T(a_i | s_i),
    a fixed target built without gradient, so this term trains only the reward head.
    """
    p = params
    if p.fixed_td_target:
        return fixed_td_target(teacher, actions, params=p, vocab_size=logits.shape[-1])
    taken = actions.unsqueeze(-1)
    if p.td_target == "teacher_expected":
        q_table = q_values(logits, q_form=p.q_form, temperature=p.temperature, ava_alpha=p.ava_alpha)
        q_taken = teacher_expectation(q_table, logprobs, teacher, temperature=p.temperature, topk_tail=p.topk_tail)
    elif p.q_form == "logits":  # z_i[a_i] / tau: one entry per row, no (m, V) table
        q_taken = logits.gather(-1, taken).squeeze(-1) / p.temperature
    elif p.q_form == "logprobs":
        q_taken = logprobs.gather(-1, taken).squeeze(-1)
    else:
        q_table = q_values(logits, q_form=p.q_form, temperature=p.temperature, ava_alpha=p.ava_alpha)
        q_taken = q_table.gather(-1, taken).squeeze(-1)
    next_value = soft_value(logits, q_form=p.q_form, temperature=p.temperature) if p.td_target == "soft" else None
    return td_difference(q_taken, nonterminal, gamma=p.gamma, next_value=next_value)


@torch.no_grad()
def fixed_td_target(teacher: TeacherSignal, actions: Tensor, *, params: XKDHyperparams, vocab_size: int) -> Tensor:
    """TD_i of a fixed target (FIXED_TD_TARGETS), (m,): built without the student's Q, so without gradient.
    Both loss paths (this module's and fused.py's) call it, so a new fixed target is written once, here."""
    p = params
    if p.td_target == "teacher_logprob":  # log p_T(a_i | s_i) at temperature tau
        return teacher_token_logprob(teacher, actions, temperature=p.temperature, topk_tail=p.topk_tail,
                                     vocab_size=vocab_size)
    raise ValueError(f"td_target {p.td_target!r} is not one of the fixed targets {FIXED_TD_TARGETS}")


def loss_output(logit_loss: Tensor, parts: tuple[Tensor, Tensor, Tensor], positions: Positions, *,
                params: XKDHyperparams, forces: Tensor | None = None) -> XKDLossOutput:
    """Add w_kl * KL(q_phi(R_i) || prior) to the logit terms' sum and collect the logged sums."""
    p, valid = params, positions.valid
    zero = logit_loss.new_zeros(())
    kl_sum = mu_sum = sigma_sum = zero
    if p.uses_reward:
        mu, log_sigma = positions.mu, positions.log_sigma
        mu_sum = torch.where(valid, mu, 0.0).sum().detach()
        sigma_sum = torch.where(valid, log_sigma.exp(), 0.0).sum().detach()
        if p.reward_kl_weight > 0:
            kl_sum = torch.where(valid, gaussian_kl_to_prior(mu, log_sigma, prior_std=p.prior_std), 0.0).sum()
    div_sum, ce_sum, td_sum = parts
    return XKDLossOutput(
        loss=logit_loss + p.reward_kl_weight * kl_sum,
        divergence=div_sum,
        ce=ce_sum,
        kl_prior=kl_sum.detach(),
        td_nll=td_sum,
        mu_sum=mu_sum,
        sigma_sum=sigma_sum,
        num_tokens=valid.sum(),
        forces=forces,
    )


def xkd_loss(
    student_logits: Tensor,
    labels: Tensor,
    *,
    teacher: TeacherSignal | None,
    mu: Tensor | None,
    log_sigma: Tensor | None,
    params: XKDHyperparams,
    position_ids: Tensor | None = None,
    eos_token_id: int | None = None,
    forces: bool = False,
) -> XKDLossOutput:
    """X-KD loss SUM over response tokens.

    student_logits (B, T, V); labels (B, T), unshifted, ignore_index where masked; teacher aligned
    with the student (position i predicts u_{i+1}), a dense one over the same V tokens; mu /
    log_sigma (B, T): the reward head applied to the student's last hidden state at every position;
    position_ids (B, T) marks packed segments (a reset to 0 starts a new sequence). forces: also measure the
    terms' pulls on the logits over every row (term_forces).
    """
    vocab_size = student_logits.shape[-1]
    positions, signal = prepare(labels, teacher, mu, log_sigma, params=params, vocab_size=vocab_size,
                                position_ids=position_ids, eos_token_id=eos_token_id)
    logits = upcast(student_logits).reshape(labels.numel(), vocab_size)
    rows = RowInputs(signal, positions.targets, positions.valid, positions.nonterminal)
    loss, parts = token_terms(logits, positions.mu, positions.log_sigma, rows, params=params)
    pulls = term_forces(logits, positions.mu, positions.log_sigma, rows, params=params) if forces else None
    return loss_output(loss, parts, positions, params=params, forces=pulls)
