"""Hand-written value and gradient of one chunk of the X-KD logit terms, in place on the chunk's logits.

Used by chunked.py for the configurations it covers (`supports`): divergence forward_kl or sequence
(or alpha_kd = 0), a dense or top-k-with-tail teacher, any q_form with the observed TD target or the fixed
teacher_logprob one (no gradient into the logits: autograd over mu and log sigma only). The
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
from dataclasses import dataclass

import torch
from torch import Tensor

from axolotl_xkd.losses.blocks import row_blocks
from axolotl_xkd.losses.categories import drop_empty_tail, teacher_topk_categories, topk_mask
from axolotl_xkd.losses.divergence import kl
from axolotl_xkd.losses.signal import DenseSignal, TeacherSignal, TopKSignal
from axolotl_xkd.losses.td import td_consistency, td_difference
from axolotl_xkd.losses.xkd import RowInputs, XKDHyperparams, fixed_td_target


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
    td_ok = not uses_td or p.td_target == "observed" or p.fixed_td_target
    return kd_ok and ce_ok and td_ok


@dataclass
class _RowStats:
    """Per-row statistics of a chunk from pass 1; afterwards the logits buffer holds pi = softmax(z / tau)
    (with a top-k teacher: pi outside the top k, 0 at its ids) and a dense teacher's buffer its p_T."""

    z_a: Tensor  # z_i[a_i]
    lse_x: Tensor  # log sum exp(z / tau)
    row_valid: Tensor  # 1.0 on the chunk's counted rows, 0.0 elsewhere (masked rows, the look-ahead row)
    lse_z: Tensor | None = None  # log sum exp(z), for CE
    dense_kl: Tensor | None = None  # KL(p_T || pi) per row
    teacher_probs: Tensor | None = None  # dense p_T, zeroed on rows that are not counted
    ids: Tensor | None = None  # top-k ids (padded slots: 0) and their validity
    ids_valid: Tensor | None = None
    logpi_ids: Tensor | None = None  # log pi and pi at the top-k ids
    pi_ids: Tensor | None = None
    pi_tail: Tensor | None = None  # pi mass outside the top k
    empty_tail: Tensor | None = None  # (m, 1) the top k cover the vocabulary
    lse_ava: Tensor | None = None  # ava: log sum_b exp(alpha pi_b) and S = sum_b softmax(alpha pi)_b pi_b
    s_ava: Tensor | None = None


@dataclass
class _Gradient:
    """d loss / d z of each row, as per-row coefficients of:
    pi * (pi_coef + tail_coef outside the top k) + target_coef * e_a - teacher_coef * p_T + softmax_coef * softmax(z)
    - ava_coef * softmax(alpha pi) * pi + sum_k ids_coef_k * e_{id_k}."""

    pi_coef: Tensor
    target_coef: Tensor
    teacher_coef: Tensor | None = None
    softmax_coef: Tensor | None = None
    ava_coef: Tensor | None = None
    ids_coef: Tensor | None = None
    tail_coef: Tensor | None = None


def _first_pass(logits: Tensor, teacher: TeacherSignal | None, safe: Tensor, row_mask: Tensor, p: XKDHyperparams, *,
                dense_kl: bool, topk_kl: bool, ava: bool) -> _RowStats:
    """Log-normalisers, the dense KL value and the top-k / ava statistics, block by block; pi into the buffer."""
    tau, m = p.temperature, logits.shape[0]
    z_a = logits.gather(-1, safe).squeeze(-1)
    rows = _RowStats(z_a=z_a, lse_x=torch.empty_like(z_a), row_valid=row_mask.to(logits.dtype))
    if p.alpha_ce > 0:
        rows.lse_z = torch.empty_like(z_a)
    if dense_kl:
        rows.dense_kl, rows.teacher_probs = torch.empty_like(z_a), teacher.logits
    if topk_kl:
        rows.ids_valid = teacher.valid
        rows.ids = torch.where(rows.ids_valid, teacher.token_ids, 0).long()
        rows.logpi_ids, rows.pi_ids = (torch.empty(rows.ids.shape, dtype=logits.dtype, device=logits.device)
                                       for _ in range(2))
        rows.pi_tail = torch.empty_like(z_a)
        rows.empty_tail = torch.empty(m, 1, dtype=torch.bool, device=logits.device)
    if ava:
        rows.lse_ava, rows.s_ava = torch.empty_like(z_a), torch.empty_like(z_a)
    for b in row_blocks(*logits.shape):
        z = logits[b]
        if rows.lse_z is not None and tau != 1.0:
            rows.lse_z[b] = torch.logsumexp(z, dim=-1)
        if tau != 1.0:
            z.div_(tau)  # x = z / tau
        # One exp per element: x' = x - max x, pi = exp(x') / sum exp(x'), log pi = x' - log sum exp(x').
        shift = z.amax(-1)
        z.sub_(shift.unsqueeze(-1))
        shifted_kl = _dense_teacher_block(rows, b, z, row_mask[b], tau) if dense_kl else None
        if topk_kl:
            rows.logpi_ids[b] = z.gather(-1, rows.ids[b])
        z.exp_()
        total = z.sum(-1)
        log_total = total.log()
        rows.lse_x[b] = shift + log_total
        if rows.lse_z is not None and tau == 1.0:
            rows.lse_z[b] = rows.lse_x[b]
        z.div_(total.unsqueeze(-1))  # pi
        if shifted_kl is not None:
            # sum p (log p - x') + log sum exp(x') sum p; at 0 at least, as divergence.kl: near-equal rows round below
            rows.dense_kl[b] = (shifted_kl + log_total).clamp(min=0.0)
        if topk_kl:
            rows.logpi_ids[b] -= log_total.unsqueeze(-1)
        if ava:
            _ava_block(rows, b, z, p.ava_alpha)
        if topk_kl:
            _topk_block(rows, b, z)
    return rows


def _dense_teacher_block(rows: _RowStats, b: slice, shifted_x: Tensor, counted: Tensor, tau: float) -> Tensor:
    """sum_v p_T (log p_T - x'_v) per row of the block, x' = x - max x (the KL less log sum exp(x')), with one exp
    per element; p_T into the teacher's own buffer, 0 on rows the loss does not count."""
    t = rows.teacher_probs[b].div_(tau) if tau != 1.0 else rows.teacher_probs[b]
    skipped = (~counted).nonzero().squeeze(-1)
    if skipped.numel():  # a non-finite teacher value on a row not counted must not reach the gradient as NaN * 0
        t.index_fill_(0, skipped, 0.0)
    t.sub_(t.amax(-1, keepdim=True)).clamp_(min=torch.finfo(t.dtype).min)  # t' = t - max t; -inf: 0 * t' stays 0
    difference = torch.sub(t, shifted_x)  # log p_T - x' + log sum exp(t'), term by term
    t.exp_()
    total = t.sum(-1)
    shifted_kl = torch.linalg.vecdot(t, difference) / total - total.log()
    t.mul_((counted / total).unsqueeze(-1))  # p_T
    return shifted_kl


def _ava_block(rows: _RowStats, b: slice, pi: Tensor, alpha: float) -> None:
    """log sum_b exp(alpha pi_b) and S = sum_b softmax(alpha pi)_b pi_b; alpha pi <= alpha, so no row max pass."""
    shift = 0.0 if alpha < 60.0 else alpha  # exp(alpha pi) stays finite for alpha up to ~80
    e = torch.mul(pi, alpha).sub_(shift).exp_()
    total = e.sum(-1)
    rows.lse_ava[b] = total.log() + shift
    rows.s_ava[b] = torch.linalg.vecdot(e, pi) / total


def _topk_block(rows: _RowStats, b: slice, pi: Tensor) -> None:
    """pi at the top-k ids and outside them; the buffer keeps pi outside the top k only."""
    rows.pi_ids[b] = pi.gather(-1, rows.ids[b])
    in_topk = topk_mask(rows.ids[b], rows.ids_valid[b], pi)
    rows.empty_tail[b] = in_topk.all(-1, keepdim=True)
    rows.pi_tail[b] = pi.masked_fill_(in_topk, 0.0).sum(-1)


def _cross_entropy(rows: _RowStats, grad: _Gradient, p: XKDHyperparams) -> Tensor:
    """CE(z, a) = logsumexp(z) - z_a;  d/dz = alpha_ce * (softmax(z) - e_a)."""
    weight = p.alpha_ce * rows.row_valid
    grad.target_coef -= weight
    if p.temperature == 1.0:
        grad.pi_coef += weight  # softmax(z) is pi
    else:
        grad.softmax_coef = weight
    return rows.lse_z - rows.z_a


def _sequence(rows: _RowStats, grad: _Gradient, weight: Tensor, tau: float) -> Tensor:
    """-log pi(a) = logsumexp(x) - x_a;  d/dz = w / tau * (pi - e_a)."""
    grad.pi_coef += weight / tau
    grad.target_coef -= weight / tau
    return rows.lse_x - rows.z_a / tau


def _forward_kl_dense(rows: _RowStats, grad: _Gradient, weight: Tensor, tau: float) -> Tensor:
    """KL(p_T || pi) = sum p_T (log p_T - log pi);  d/dz = w / tau * (pi - p_T)."""
    grad.pi_coef += weight / tau
    grad.teacher_coef = weight / tau
    return rows.dense_kl


def _forward_kl_topk(rows: _RowStats, grad: _Gradient, weight: Tensor, teacher: TopKSignal, tau: float) -> Tensor:
    """KL over the k + 1 categories;  d/dz = w / tau * (pi - sum_k p_k e_k - (p_tail / pi_tail) * pi [not in top k])."""
    t_cat = teacher_topk_categories(teacher, temperature=tau, tail=True)
    t_cat = drop_empty_tail(t_cat, rows.empty_tail)
    s_cat = torch.cat([torch.where(rows.ids_valid, rows.logpi_ids, -math.inf), rows.pi_tail.log().unsqueeze(-1)], -1)
    teacher_p = t_cat.exp()
    grad.pi_coef += weight / tau
    grad.ids_coef = -(weight / tau).unsqueeze(-1) * teacher_p[:, :-1]
    grad.tail_coef = -(weight / tau) * teacher_p[:, -1] / rows.pi_tail.clamp(min=torch.finfo(rows.pi_tail.dtype).tiny)
    return kl(t_cat, s_cat)


def _q_value(rows: _RowStats, p: XKDHyperparams) -> Tensor:
    """Q(s_i, a_i): x_a (logits), x_a - logsumexp(x) (logprobs), alpha pi_a - log sum_b exp(alpha pi_b) (ava)."""
    x_a = rows.z_a / p.temperature
    if p.q_form == "logits":
        return x_a
    if p.q_form == "logprobs":
        return x_a - rows.lse_x
    return p.ava_alpha * (x_a - rows.lse_x).exp() - rows.lse_ava


def _q_gradient(rows: _RowStats, grad: _Gradient, c: Tensor, p: XKDHyperparams) -> None:
    """Add c * dQ/dz: logits c / tau * e_a; logprobs c / tau * (e_a - pi);
    ava c alpha / tau * (pi_a e_a - (pi_a - S) pi - s * pi), s = softmax(alpha pi), S = sum_b s_b pi_b."""
    tau = p.temperature
    if p.q_form == "ava":
        pi_a = (rows.z_a / tau - rows.lse_x).exp()
        grad.ava_coef = c * p.ava_alpha / tau
        grad.target_coef += grad.ava_coef * pi_a
        grad.pi_coef -= grad.ava_coef * (pi_a - rows.s_ava)
        return
    grad.target_coef += c / tau
    if p.q_form == "logprobs":
        grad.pi_coef -= c / tau


def _td_nll(q: Tensor, mu: Tensor, log_sigma: Tensor, nonterminal: Tensor, valid: Tensor, *, gamma: float,
            weight: float) -> tuple[Tensor, Tensor]:
    """_fixed_td_nll of TD_i = Q(s_i, a_i) - gamma Q(s'_i, a'_i), the observed target built from Q."""
    return _fixed_td_nll(mu, log_sigma, td_difference(q, nonterminal, gamma=gamma)[: valid.shape[0]], valid,
                         weight=weight)


def _fixed_td_nll(mu: Tensor, log_sigma: Tensor, td: Tensor, valid: Tensor, *, weight: float) -> tuple[Tensor, Tensor]:
    """lambda * sum of -log N(TD_i; mu_i, sigma_i^2) over the chunk's valid rows, and the unweighted sum."""
    total = torch.where(valid, td_consistency(td, mu, log_sigma), 0.0).sum()
    return weight * total, total.detach()


def _write_gradient(logits: Tensor, rows: _RowStats, grad: _Gradient, safe: Tensor, p: XKDHyperparams) -> Tensor:
    """Pass 2, block by block: the gradient of _Gradient in place of pi in the logits buffer."""
    tau = p.temperature
    if grad.ids_coef is not None:  # the buffer holds 0 at the top-k ids: their pi terms go in through the ids
        at_ids = grad.pi_coef.unsqueeze(-1) * rows.pi_ids + grad.ids_coef
        if grad.ava_coef is not None:
            s_ids = (rows.pi_ids * p.ava_alpha - rows.lse_ava.unsqueeze(-1)).exp()
            at_ids = at_ids - grad.ava_coef.unsqueeze(-1) * s_ids * rows.pi_ids
        at_ids = torch.where(rows.ids_valid, at_ids, 0.0)
        pi_coef = grad.pi_coef + grad.tail_coef
    else:
        pi_coef = grad.pi_coef
    # softmax(z) = pi^tau * exp(tau * logsumexp(x) - logsumexp(z))
    softmax_scale = (grad.softmax_coef * (tau * rows.lse_x - rows.lse_z).exp()).unsqueeze(-1) \
        if grad.softmax_coef is not None else None
    for b in row_blocks(*logits.shape):
        g = logits[b]
        softmax_part = g.pow(tau).mul_(softmax_scale[b]) if softmax_scale is not None else None
        if grad.ava_coef is not None:  # (pi_coef - ava_coef * s) * pi
            factor = torch.mul(g, p.ava_alpha).sub_(rows.lse_ava[b].unsqueeze(-1)).exp_()
            g.mul_(factor.mul_(-grad.ava_coef[b].unsqueeze(-1)).add_(pi_coef[b].unsqueeze(-1)))
        else:
            g.mul_(pi_coef[b].unsqueeze(-1))
        if grad.teacher_coef is not None:
            g.addcmul_(rows.teacher_probs[b], grad.teacher_coef[b].unsqueeze(-1), value=-1.0)
        if grad.ids_coef is not None:
            g.scatter_add_(-1, rows.ids[b], at_ids[b])
        if softmax_part is not None:
            g.add_(softmax_part)
        g.scatter_add_(-1, safe[b], grad.target_coef[b].unsqueeze(-1))
    return logits


def fused_chunk(logits: Tensor, mu: Tensor | None, log_sigma: Tensor | None, inputs: RowInputs, *,
                params: XKDHyperparams, need_grad: bool
                ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """(d loss / d logits, d loss / d mu, d loss / d log_sigma, loss, (D, CE, TD-NLL sums)) of one chunk.

    Same inputs as xkd.token_terms, but logits (m, V) is OVERWRITTEN (it becomes the gradient), and so is a
    dense teacher's logits buffer.
    """
    p, tau = params, params.temperature
    teacher, targets, valid, nonterminal = inputs
    m, n = logits.shape[0], valid.shape[0]
    row_mask = torch.cat([valid, valid.new_zeros(m - n)])  # False on the look-ahead row
    safe = torch.where(targets != p.ignore_index, targets, 0).unsqueeze(-1)
    kd_on = p.alpha_kd > 0
    dense_kl = kd_on and p.divergence == "forward_kl" and isinstance(teacher, DenseSignal)
    topk_kl = kd_on and p.divergence == "forward_kl" and isinstance(teacher, TopKSignal)
    fixed_td = nonterminal is not None and p.fixed_td_target
    # Read before pass 1 overwrites a dense teacher's buffer.
    td_target = fixed_td_target(teacher.rows(slice(0, n)), safe[:n, 0], params=p,
                                vocab_size=logits.shape[-1]) if fixed_td else None
    ava = nonterminal is not None and p.q_form == "ava" and not fixed_td
    rows = _first_pass(logits, teacher, safe, row_mask, p, dense_kl=dense_kl, topk_kl=topk_kl, ava=ava)

    def counted_sum(values: Tensor) -> Tensor:
        return torch.where(row_mask, values, 0.0).sum()

    grad = _Gradient(pi_coef=torch.zeros_like(rows.z_a), target_coef=torch.zeros_like(rows.z_a))
    zero = logits.new_zeros(())
    div_sum = ce_sum = td_sum = zero
    grad_mu = grad_log_sigma = None
    if p.alpha_ce > 0:
        ce_sum = counted_sum(_cross_entropy(rows, grad, p))
    if fixed_td:  # the target does not depend on the logits: gradients for mu and log sigma only
        fn = torch.func.grad_and_value(_fixed_td_nll, argnums=(0, 1), has_aux=True)
        (grad_mu, grad_log_sigma), (_, td_sum) = fn(mu, log_sigma, td_target, valid, weight=p.td_weight)
    elif nonterminal is not None:  # TD: c = d loss / d Q(s_i, a_i) by autograd over the (m,) vectors
        fn = torch.func.grad_and_value(_td_nll, argnums=(0, 1, 2), has_aux=True)
        (c, grad_mu, grad_log_sigma), (_, td_sum) = fn(
            _q_value(rows, p), mu, log_sigma, nonterminal, valid, gamma=p.gamma, weight=p.td_weight
        )
        _q_gradient(rows, grad, c, p)
    if kd_on:
        scale = tau**2 if p.scale_by_tau_squared and p.divergence != "sequence" else 1.0
        weight = p.alpha_kd * scale * rows.row_valid
        if p.divergence == "sequence":
            per_token = _sequence(rows, grad, weight, tau)
        elif dense_kl:
            per_token = _forward_kl_dense(rows, grad, weight, tau) * scale
        else:
            per_token = _forward_kl_topk(rows, grad, weight, teacher, tau) * scale
        div_sum = counted_sum(per_token)
    loss = p.alpha_kd * div_sum + p.alpha_ce * ce_sum + p.td_weight * td_sum
    grad_logits = _write_gradient(logits, rows, grad, safe, p) if need_grad else None
    return grad_logits, grad_mu, grad_log_sigma, loss, (div_sum, ce_sum, td_sum)
