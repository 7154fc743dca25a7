"""Hand-written value and gradient of one chunk of the X-KD logit terms, in place on the chunk's logits.

Used by chunked.py for the configurations it covers (`supports`): divergence forward_kl or sequence
(or alpha_kd = 0), a dense or top-k-with-tail teacher, any q_form with the observed TD target. The
others go through torch.func autograd. Why by hand: autograd keeps every (C, V) intermediate of
log_softmax / KL / CE alive for the backward pass (7-9 buffers of the chunk's size); written out,
the gradient is a per-row combination of the student softmax pi, the teacher's probabilities and a
few sparse entries, built in the logits buffer itself (the dense teacher's probabilities live in its
own logits buffer). The elementwise work runs over blocks of a few rows (about 4 MB), so that the
several passes over a block hit the cache instead of memory.

Gradients w.r.t. the logits z of a row (x = z / tau, pi = softmax(x), w the term's weight):
  forward KL, dense teacher p:     w * tau^2_scale / tau * (pi - p)
  forward KL, top-k + tail:        w / tau * (pi - sum_k p_k e_k - (p_tail / pi_tail) * pi * [not in top-k])
  sequence (-log pi[a]):           w / tau * (pi - e_a)
  CE(z, a):                        w * (softmax(z) - e_a)
  Q = z[a] / tau (q_form logits):  c / tau * e_a;   Q = log pi[a] (logprobs): c / tau * (e_a - pi)
  Q = alpha pi[a] - log sum_b exp(alpha pi_b) (ava):
                                   c alpha / tau * (pi_a e_a - (pi_a - S) pi - s * pi),
                                   s = softmax(alpha pi), S = sum_b s_b pi_b
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

# Elements per block of rows: 2^20 float32 values (4 MB) stay in cache across the passes over a block.
_BLOCK_ELEMENTS = 2**20


def supports(params: XKDHyperparams, teacher_kind: str, uses_td: bool) -> bool:
    """Whether `fused_chunk` computes this configuration (else chunked.py uses autograd)."""
    p = params
    kd_ok = p.alpha_kd == 0 or p.divergence == "sequence" or (
        p.divergence == "forward_kl" and (teacher_kind == "dense" or (teacher_kind == "topk" and p.topk_tail))
    )
    # With a top-k teacher the logits buffer holds pi outside the top k only, so softmax(z) for CE at
    # tau != 1 cannot be rebuilt from it.
    topk_kl = p.alpha_kd > 0 and p.divergence == "forward_kl" and teacher_kind == "topk"
    ce_ok = p.alpha_ce == 0 or p.temperature == 1.0 or not topk_kl
    td_ok = not uses_td or p.td_target == "observed"
    return kd_ok and ce_ok and td_ok


def _td_loss(q: Tensor, mean: Tensor, log_std: Tensor, nonterminal: Tensor, valid: Tensor, *, gamma: float,
             weight: float) -> tuple[Tensor, Tensor]:
    """lambda * sum of -log N(TD_i; mu_i, sigma_i^2) over the chunk's valid rows, and the unweighted sum."""
    td = td_difference(q.unsqueeze(0), nonterminal.unsqueeze(0), gamma=gamma)[0, : valid.shape[0]]
    total = torch.where(valid, td_consistency(td, mean, log_std), 0.0).sum()
    return weight * total, total.detach()


def _blocks(rows: int, vocab: int) -> list[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(vocab, 1))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def logsumexp_rows(values: Tensor) -> Tensor:
    """logsumexp over the last dim of (m, V), (m,), with cache-sized (block, V) temporaries."""
    return torch.cat([torch.logsumexp(values[b], dim=-1) for b in _blocks(*values.shape)])


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
    m, vocab = logits.shape
    n = valid.shape[0]
    blocks = _blocks(m, vocab)
    row_mask = torch.cat([valid, valid.new_zeros(m - n)])  # False on the look-ahead row
    row_valid = row_mask.to(logits.dtype)
    safe = torch.where(targets != p.ignore_index, targets, 0).unsqueeze(-1)
    z_a = logits.gather(-1, safe).squeeze(-1)
    zero = logits.new_zeros(())
    div_sum = ce_sum = td_sum = zero
    grad_mean = grad_log_std = None
    kd_on, ce_on = p.alpha_kd > 0, p.alpha_ce > 0
    dense_kl = kd_on and p.divergence == "forward_kl" and teacher_kind == "dense"
    topk_kl = kd_on and p.divergence == "forward_kl" and teacher_kind == "topk"
    lse_z = torch.empty_like(z_a) if ce_on else None
    lse_x = torch.empty_like(z_a)
    dense_kl_rows = torch.empty_like(z_a) if dense_kl else None
    if topk_kl:
        signal = TopKSignal(*teacher_rows)
        topk_valid = signal.valid
        ids = torch.where(topk_valid, signal.token_ids, 0).long()
        logpi_ids, pi_ids = (torch.empty(ids.shape, dtype=logits.dtype, device=logits.device) for _ in range(2))
        tail = torch.empty_like(z_a)
        empty_tail = torch.empty(m, 1, dtype=torch.bool, device=logits.device)
    teacher = teacher_rows[0] if dense_kl else None
    ava = nonterminal is not None and p.q_form == "ava"
    if ava:  # per row: log sum_b exp(alpha pi_b) and S = sum_b softmax(alpha pi)_b pi_b
        lse_ava, s_ava = torch.empty_like(z_a), torch.empty_like(z_a)
        # exp(alpha pi) stays finite for alpha up to ~80; beyond, shift by alpha (the largest possible value).
        ava_shift = 0.0 if p.ava_alpha < 60.0 else p.ava_alpha

    # Pass 1, per block: log-normalisers, the dense KL value, pi in the logits buffer (top-k: its tail part).
    for b in blocks:
        z = logits[b]
        if ce_on:
            lse_z[b] = torch.logsumexp(z, dim=-1)
        if tau != 1.0:
            z.div_(tau)  # x = z / tau
        lse_x[b] = lse_z[b] if ce_on and tau == 1.0 else torch.logsumexp(z, dim=-1)
        z.sub_(lse_x[b].unsqueeze(-1))  # log pi
        if dense_kl:
            t = teacher[b].div_(tau) if tau != 1.0 else teacher[b]
            t.sub_(torch.logsumexp(t, dim=-1, keepdim=True)).clamp_(min=torch.finfo(t.dtype).min)  # log p
            probs = t.exp()
            # sum p (log p - log pi) term by term, as kl() does: two separate large sums would cancel
            dense_kl_rows[b] = (probs * (t - z)).sum(-1)
            t.copy_(probs)  # the teacher's buffer now holds p
        if topk_kl:
            logpi_ids[b] = z.gather(-1, ids[b])
        z.exp_()  # pi
        if ava:  # alpha pi <= alpha, so exp(alpha pi - shift) needs no per-row max pass
            e = torch.mul(z, p.ava_alpha).sub_(ava_shift).exp_()
            total = e.sum(-1)
            lse_ava[b] = total.log() + ava_shift
            s_ava[b] = torch.linalg.vecdot(e, z) / total
        if topk_kl:
            pi_ids[b] = z.gather(-1, ids[b])
            in_topk = topk_mask(ids[b], topk_valid[b], z)
            empty_tail[b] = in_topk.all(-1, keepdim=True)
            tail[b] = z.masked_fill_(in_topk, 0.0).sum(-1)  # pi outside the top k stays in the buffer

    # Per-row coefficients of the gradient: pi_coef * pi + at_target * e_a (+ the teacher terms).
    pi_coef = torch.zeros_like(z_a)
    at_target = torch.zeros_like(z_a)
    if ce_on:
        ce_sum = torch.where(row_mask, lse_z - z_a, 0.0).sum()
        at_target -= p.alpha_ce * row_valid
        if tau == 1.0:
            pi_coef += p.alpha_ce * row_valid
    x_a = z_a / tau
    if nonterminal is not None:  # TD: c = d loss / d Q(s_i, a_i) by autograd over (m,) vectors
        if p.q_form == "ava":
            pi_a = (x_a - lse_x).exp()
            q = p.ava_alpha * pi_a - lse_ava
        else:
            q = x_a if p.q_form == "logits" else x_a - lse_x
        fn = torch.func.grad_and_value(_td_loss, argnums=(0, 1, 2), has_aux=True)
        (grad_q, grad_mean, grad_log_std), (_, td_sum) = fn(
            q, mean, log_std, nonterminal, valid, gamma=p.gamma, weight=p.td_weight
        )
        if p.q_form == "ava":
            ava_coef = grad_q * p.ava_alpha / tau  # its - s * pi part is added per element in pass 2
            at_target += ava_coef * pi_a
            pi_coef -= ava_coef * (pi_a - s_ava)
        else:
            at_target += grad_q / tau
            if p.q_form == "logprobs":
                pi_coef -= grad_q / tau
    kd_weight = zero
    if kd_on:
        scale = p.temperature**2 if p.scale_by_tau_squared and p.divergence != "sequence" else 1.0
        kd_weight = p.alpha_kd * scale / tau * row_valid
        pi_coef += kd_weight
        if p.divergence == "sequence":
            per_token = lse_x - x_a
            at_target -= kd_weight
        elif dense_kl:
            per_token = dense_kl_rows * scale
        else:
            t_cat = teacher_topk_categories(signal, temperature=tau, tail=True)
            # As paired_categories: with no token outside the top k the teacher's tail mass is dropped (issue 3).
            no_tail = torch.cat([t_cat[:, :-1], torch.full_like(t_cat[:, -1:], -math.inf)], dim=-1)
            t_cat = torch.where(empty_tail, torch.log_softmax(no_tail, dim=-1), t_cat)
            s_cat = torch.cat(
                [torch.where(topk_valid, logpi_ids, -math.inf), tail.log().unsqueeze(-1)], dim=-1
            )
            per_token = kl(t_cat, s_cat) * scale
            teacher_p = t_cat.exp()
            tail_ratio = teacher_p[:, -1] / tail.clamp(min=torch.finfo(tail.dtype).tiny)
            # top-k tokens: pi_coef * pi - kd_weight * p_k; tail tokens: (pi_coef - kd_weight * tail_ratio) * pi
            at_ids = torch.where(
                topk_valid, pi_coef.unsqueeze(-1) * pi_ids - kd_weight.unsqueeze(-1) * teacher_p[:, :-1], 0.0
            )
            pi_coef = pi_coef - kd_weight * tail_ratio
            if ava:  # the buffer holds 0 at the top-k ids, so their - s * pi part goes in here
                s_ids = (pi_ids * p.ava_alpha - lse_ava.unsqueeze(-1)).exp()
                at_ids -= torch.where(topk_valid, ava_coef.unsqueeze(-1) * s_ids * pi_ids, 0.0)
        div_sum = torch.where(row_mask, per_token, 0.0).sum()
    loss = p.alpha_kd * div_sum + p.alpha_ce * ce_sum + p.td_weight * td_sum
    if not need_grad:
        return None, grad_mean, grad_log_std, loss, (div_sum, ce_sum, td_sum)

    # Pass 2, per block: the gradient, in place of pi.
    ce_scale = (p.alpha_ce * row_valid * (tau * lse_x - lse_z).exp()).unsqueeze(-1) if ce_on and tau != 1.0 else None
    for b in blocks:
        g = logits[b]
        ce_softmax = g.pow(tau).mul_(ce_scale[b]) if ce_scale is not None else None  # alpha_ce * softmax(z)
        if ava:  # (pi_coef - ava_coef * s) * pi, s = softmax(alpha pi)
            factor = torch.mul(g, p.ava_alpha).sub_(lse_ava[b].unsqueeze(-1)).exp_()
            g.mul_(factor.mul_(-ava_coef[b].unsqueeze(-1)).add_(pi_coef[b].unsqueeze(-1)))
        else:
            g.mul_(pi_coef[b].unsqueeze(-1))
        if dense_kl:
            g.sub_(teacher[b].mul_(kd_weight[b].unsqueeze(-1)))
        if topk_kl:
            g.scatter_add_(-1, ids[b], at_ids[b])
        if ce_softmax is not None:
            g.add_(ce_softmax)
        g.scatter_add_(-1, safe[b], at_target[b].unsqueeze(-1))
    return logits, grad_mean, grad_log_std, loss, (div_sum, ce_sum, td_sum)
