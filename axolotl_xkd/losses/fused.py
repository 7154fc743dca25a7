"""Hand-written value and gradient of one chunk of the X-KD logit terms, in place on the chunk's logits.

Used by chunked.py for the configurations it covers (`supports`): divergence forward_kl or sequence
(or alpha_kd = 0), a dense or top-k-with-tail teacher, q_form logits or logprobs with the observed TD
target. The others go through torch.func autograd. Why by hand: autograd keeps every (C, V)
intermediate of log_softmax / KL / CE alive for the backward pass (7-9 buffers of the chunk's size);
written out, the gradient is a per-row combination of the student softmax pi, the teacher's
probabilities and a few sparse entries, built in the logits buffer itself (2-4 buffers).

Gradients w.r.t. the logits z of a row (x = z / tau, pi = softmax(x), w the term's weight):
  forward KL, dense teacher p:     w * tau^2_scale / tau * (pi - p)
  forward KL, top-k + tail:        w / tau * (pi - sum_k p_k e_k - (p_tail / pi_tail) * pi * [not in top-k])
  sequence (-log pi[a]):           w / tau * (pi - e_a)
  CE(z, a):                        w * (softmax(z) - e_a)
  Q = z[a] / tau (q_form logits):  c / tau * e_a;   Q = log pi[a] (logprobs): c / tau * (e_a - pi)
where c = d loss / d Q comes from autograd over the small (C,) TD vectors. Imports torch only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from axolotl_xkd.losses.categories import teacher_topk_categories, topk_mask
from axolotl_xkd.losses.divergence import kl
from axolotl_xkd.losses.signal import TopKSignal
from axolotl_xkd.losses.td import td_consistency, td_difference
from axolotl_xkd.losses.xkd import XKDHyperparams


def supports(params: XKDHyperparams, teacher_kind: str, uses_td: bool) -> bool:
    """Whether `fused_chunk` computes this configuration (else chunked.py uses autograd)."""
    p = params
    kd_ok = p.alpha_kd == 0 or p.divergence == "sequence" or (
        p.divergence == "forward_kl" and (teacher_kind == "dense" or (teacher_kind == "topk" and p.topk_tail))
    )
    td_ok = not uses_td or (p.q_form in ("logits", "logprobs") and p.td_target == "observed")
    return kd_ok and td_ok


def _td_loss(q: Tensor, mean: Tensor, log_std: Tensor, nonterminal: Tensor, valid: Tensor, *, gamma: float,
             weight: float) -> tuple[Tensor, Tensor]:
    """lambda * sum of -log N(TD_i; mu_i, sigma_i^2) over the chunk's valid rows, and the unweighted sum."""
    td = td_difference(q.unsqueeze(0), nonterminal.unsqueeze(0), gamma=gamma)[0, : valid.shape[0]]
    total = torch.where(valid, td_consistency(td, mean, log_std), 0.0).sum()
    return weight * total, total.detach()


# Row reductions run over blocks of rows so that their temporaries stay a fraction of the chunk.
_BLOCK_ROWS = 128


def logsumexp_rows(values: Tensor) -> Tensor:
    """logsumexp over the last dim of (m, V), (m,), with (block, V) temporaries."""
    return torch.cat([torch.logsumexp(block, dim=-1) for block in values.split(_BLOCK_ROWS)])


def _kl_rows(teacher_logprobs: Tensor, scaled_logits: Tensor) -> Tensor:
    """sum_j p_j (log p_j - x_j) per row, p = exp(teacher_logprobs); entries with p = 0 give 0."""
    low = torch.finfo(teacher_logprobs.dtype).min
    return torch.cat([
        (t.exp() * (t.clamp(min=low) - x)).sum(-1)
        for t, x in zip(teacher_logprobs.split(_BLOCK_ROWS), scaled_logits.split(_BLOCK_ROWS))
    ])


def fused_chunk(
    logits: Tensor,
    mean: Tensor | None,
    log_std: Tensor | None,
    teacher_rows: tuple[Tensor, ...],
    targets: Tensor,
    valid: Tensor,
    nonterminal: Tensor | None,
    *,
    params: XKDHyperparams,
    teacher_kind: str,
    need_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """(d loss / d logits, d loss / d mean, d loss / d log_std, loss, (div, ce, td_nll sums)) of one chunk.

    Same layout as chunked._chunk_terms: logits (m, V) at least float32 and OVERWRITTEN (it becomes the
    gradient); valid (n,) with n = m or m - 1 (the look-ahead row); teacher_rows (m rows) writable.
    """
    p, tau = params, params.temperature
    m, n = logits.shape[0], valid.shape[0]
    row_mask = torch.cat([valid, valid.new_zeros(m - n)])  # False on the look-ahead row
    row_valid = row_mask.to(logits.dtype)
    safe = torch.where(targets != p.ignore_index, targets, 0).unsqueeze(-1)
    z_a = logits.gather(-1, safe).squeeze(-1)
    zero = logits.new_zeros(())
    div_sum = ce_sum = td_sum = zero
    grad_mean = grad_log_std = None
    pi_coef = torch.zeros_like(z_a)  # per-row factor on pi in the gradient
    at_target = torch.zeros_like(z_a)  # per-row gradient entry added at the target token

    lse_z = None
    if p.alpha_ce > 0:
        lse_z = logsumexp_rows(logits)
        ce_sum = torch.where(row_mask, lse_z - z_a, 0.0).sum()
        at_target -= p.alpha_ce * row_valid
    x = logits.div_(tau) if tau != 1.0 else logits
    lse_x = lse_z if lse_z is not None and tau == 1.0 else logsumexp_rows(x)
    x_a = z_a / tau

    if nonterminal is not None:  # TD: c = d loss / d Q(s_i, a_i) by autograd over (m,) vectors
        q = x_a if p.q_form == "logits" else x_a - lse_x
        fn = torch.func.grad_and_value(_td_loss, argnums=(0, 1, 2), has_aux=True)
        (grad_q, grad_mean, grad_log_std), (_, td_sum) = fn(
            q, mean, log_std, nonterminal, valid, gamma=p.gamma, weight=p.td_weight
        )
        at_target += grad_q / tau
        if p.q_form == "logprobs":
            pi_coef -= grad_q / tau

    teacher_logprobs = None  # dense teacher, (m, V) in the teacher's own buffer
    kd_weight = zero
    if p.alpha_kd > 0:
        scale = p.temperature**2 if p.scale_by_tau_squared and p.divergence != "sequence" else 1.0
        kd_weight = p.alpha_kd * scale / tau * row_valid
        if p.divergence == "sequence":
            per_token = lse_x - x_a
            pi_coef += kd_weight
            at_target -= kd_weight
        elif teacher_kind == "dense":
            teacher_logprobs = teacher_rows[0].div_(tau) if tau != 1.0 else teacher_rows[0]
            teacher_logprobs -= logsumexp_rows(teacher_logprobs).unsqueeze(-1)
            # sum p (log p - log pi) = sum p (log p - x) + lse_x, as sum p = 1
            per_token = (_kl_rows(teacher_logprobs, x) + lse_x) * scale
            pi_coef += kd_weight
        else:
            signal = TopKSignal(*teacher_rows)
            t_cat = teacher_topk_categories(signal, temperature=tau, tail=True)
            topk_valid = signal.valid
            ids = torch.where(topk_valid, signal.token_ids, 0).long()
            x_ids = x.gather(-1, ids)

    pi = x.sub_(lse_x.unsqueeze(-1)).exp_()  # the logits buffer now holds pi = softmax(z / tau)
    if p.alpha_ce > 0 and tau != 1.0:
        ce_softmax = pi.pow(tau).mul_((tau * lse_x - lse_z).exp().mul_(p.alpha_ce * row_valid).unsqueeze(-1))
    elif p.alpha_ce > 0:
        ce_softmax = None
        pi_coef += p.alpha_ce * row_valid

    if p.alpha_kd > 0 and teacher_kind == "topk" and p.divergence == "forward_kl":
        pi_ids = pi.gather(-1, ids)
        in_topk = topk_mask(ids, topk_valid, pi)
        empty_tail = in_topk.all(-1, keepdim=True)
        pi.masked_fill_(in_topk, 0.0)  # pi outside the top k: the tail part of the gradient
        del in_topk
        tail = pi.sum(-1)
        # As paired_categories: with no token outside the top k the teacher's tail mass is dropped (issue 3).
        no_tail = torch.cat([t_cat[:, :-1], torch.full_like(t_cat[:, -1:], -math.inf)], dim=-1)
        t_cat = torch.where(empty_tail, torch.log_softmax(no_tail, dim=-1), t_cat)
        s_cat = torch.cat(
            [torch.where(topk_valid, x_ids - lse_x.unsqueeze(-1), -math.inf), tail.log().unsqueeze(-1)], dim=-1
        )
        per_token = kl(t_cat, s_cat)
        if p.scale_by_tau_squared:
            per_token = per_token * p.temperature**2
        teacher_p = t_cat.exp()
        tail_ratio = teacher_p[:, -1] / tail.clamp(min=torch.finfo(tail.dtype).tiny)
        # tail tokens: (pi_coef + kd_weight - kd_weight * tail_ratio) * pi; top-k tokens: (pi_coef + kd_weight) * pi - kd_weight * p_k
        full_coef = pi_coef + kd_weight
        grad = pi.mul_((full_coef - kd_weight * tail_ratio).unsqueeze(-1))
        at_ids = full_coef.unsqueeze(-1) * pi_ids - kd_weight.unsqueeze(-1) * teacher_p[:, :-1]
        grad.scatter_add_(-1, ids, torch.where(topk_valid, at_ids, 0.0))
    else:
        grad = pi.mul_(pi_coef.unsqueeze(-1))
        if teacher_logprobs is not None:  # - kd_weight * p, p made in the teacher's buffer
            grad -= teacher_logprobs.exp_().mul_(kd_weight.unsqueeze(-1))
    if p.alpha_kd > 0:
        div_sum = torch.where(row_mask, per_token, 0.0).sum()
    if p.alpha_ce > 0 and ce_softmax is not None:
        grad += ce_softmax
    grad.scatter_add_(-1, safe, at_target.unsqueeze(-1))
    loss = p.alpha_kd * div_sum + p.alpha_ce * ce_sum + p.td_weight * td_sum
    return (grad if need_grad else None), grad_mean, grad_log_std, loss, (div_sum, ce_sum, td_sum)
