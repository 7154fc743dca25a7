"""The X-KD loss of xkd.py, fused with the student's output layer and computed a chunk of positions at a time.

`chunked_xkd_loss` takes the student's last hidden states and output layer instead of logits, so the
full (N, V) student logits (and, with a `DenseHiddenSignal`, the teacher's) never exist: each chunk of
C positions forms its (C, V) logits, computes every per-token term, and turns them into gradients for
the hidden states, the output layer and the reward-head outputs before the next chunk starts (the
Liger pattern: gradients are produced in the forward pass and only scaled in the backward pass).

The TD term couples position i with i+1 (Q(s'_i, a'_i) is the Q value at i+1). A chunk of rows
[s, e) therefore also forms the logits of row e (one look-ahead row, ~1/C extra work) so that TD_{e-1}
and its gradient, which flows into row e too, are complete inside the chunk. Positions are flattened
(B, T) -> (N,) after the terminal flags are computed on (B, T), and the last position of every row and
of every packed segment is terminal, so no TD pair crosses a row or a segment.

Why not `LigerFusedLinearDistillationBase`: it splits inputs with `torch.chunk` into independent
chunks (no look-ahead row for the TD pair), passes no per-position tensors besides the labels (the
reward-head outputs, terminal flags and top-k teacher rows have no slot), always builds the output
layer's gradient (a frozen LoRA base layer must not get one), and divides by the token count (X-KD
returns sums). The loop below keeps its shape: `torch.func.grad_and_value` per chunk, optionally
under `torch.compile`. Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from axolotl_xkd.losses import fused
from axolotl_xkd.losses.categories import paired_categories, teacher_expectation
from axolotl_xkd.losses.divergence import divergence
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.losses.signal import DenseHiddenSignal, DenseSignal, TopKSignal
from axolotl_xkd.losses.td import (
    gaussian_kl_to_prior,
    nonterminal_next,
    q_values,
    shift_targets,
    td_consistency,
    td_difference,
)
from axolotl_xkd.losses.xkd import XKDHyperparams, XKDLossOutput, align_reward

ChunkedTeacher = DenseHiddenSignal | DenseSignal | TopKSignal
MODES = ("fused", "autograd", "compiled")


def _chunk_terms(
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
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Weighted loss sum of one chunk and its (divergence, ce, td_nll) sums.

    logits (m, V) at least float32; valid (n,) with n = m or n = m - 1: rows [0, n) are the chunk,
    row n (when present) is the look-ahead row whose Q value TD_{n-1} needs. targets, nonterminal and
    the teacher rows cover all m rows; mean and log_std (n,) are the aligned reward-head outputs.
    """
    p = params
    n = valid.shape[0]
    safe_targets = torch.where(targets != p.ignore_index, targets, 0).unsqueeze(-1)
    logprobs = torch.log_softmax(logits / p.temperature, dim=-1)
    teacher = None
    if teacher_kind == "dense":
        teacher = DenseSignal(teacher_rows[0])
    elif teacher_kind == "topk":
        teacher = TopKSignal(*teacher_rows)
    zero = logits.new_zeros(())

    def masked_sum(values: Tensor) -> Tensor:
        return torch.where(valid, values, 0.0).sum()

    div_sum = ce_sum = td_sum = zero
    if p.alpha_kd > 0:
        if p.divergence == "sequence":
            per_token = -logprobs[:n].gather(-1, safe_targets[:n]).squeeze(-1)
        else:
            head = _first_rows(teacher, n)
            s_cat, t_cat = paired_categories(logprobs[:n], head, temperature=p.temperature, topk_tail=p.topk_tail)
            per_token = divergence(s_cat, t_cat, name=p.divergence, beta=p.beta, skew_alpha=p.skew_alpha)
            if p.scale_by_tau_squared:
                per_token = per_token * p.temperature**2
        div_sum = masked_sum(per_token)
    if p.alpha_ce > 0:
        ce_sum = masked_sum(F.cross_entropy(logits[:n], safe_targets[:n, 0], reduction="none"))
    if nonterminal is not None:
        if p.td_target == "teacher_expected":
            q_table = q_values(logits, q_form=p.q_form, temperature=p.temperature, ava_alpha=p.ava_alpha)
            q_taken = teacher_expectation(q_table, logprobs, teacher, temperature=p.temperature, topk_tail=p.topk_tail)
        elif p.q_form == "logits":  # z_i[a_i] / tau: one row of the output layer, no (m, V) table
            q_taken = logits.gather(-1, safe_targets).squeeze(-1) / p.temperature
        elif p.q_form == "logprobs":
            q_taken = logprobs.gather(-1, safe_targets).squeeze(-1)
        else:
            q_table = q_values(logits, q_form=p.q_form, temperature=p.temperature, ava_alpha=p.ava_alpha)
            q_taken = q_table.gather(-1, safe_targets).squeeze(-1)
        td = td_difference(q_taken.unsqueeze(0), nonterminal.unsqueeze(0), gamma=p.gamma)[0, :n]
        td_sum = masked_sum(td_consistency(td, mean, log_std))
    loss = p.alpha_kd * div_sum + p.alpha_ce * ce_sum + p.td_weight * td_sum
    return loss, (div_sum.detach(), ce_sum.detach(), td_sum.detach())


def _first_rows(teacher: DenseSignal | TopKSignal, n: int) -> DenseSignal | TopKSignal:
    """The first n rows of a chunk's teacher signal (dropping the look-ahead row)."""
    if isinstance(teacher, DenseSignal):
        return DenseSignal(teacher.logits[:n])
    return TopKSignal(teacher.token_ids[:n], teacher.logprobs[:n])


def _accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, else the input's own (float32 or float64)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Plan:
    """What the autograd Function needs besides its differentiable inputs; per-position tensors are flat (N, ...)."""

    params: XKDHyperparams
    teacher: ChunkedTeacher | None
    targets: Tensor
    valid: Tensor
    nonterminal: Tensor | None
    chunk_size: int
    mode: str
    grad_enabled: bool  # Function.forward sees needs_input_grad True even under no_grad (evaluation)

    @property
    def teacher_kind(self) -> str:
        if self.teacher is None:
            return "none"
        return "topk" if isinstance(self.teacher, TopKSignal) else "dense"

    def teacher_rows(self, start: int, stop: int, *, writable: bool = False) -> tuple[Tensor, ...]:
        """The teacher's tensors for flat positions [start, stop): logits (dense) or (ids, logprobs).

        writable: dense logits come as a fresh, at least float32 tensor the caller may overwrite.
        """
        t = self.teacher
        if t is None:
            return ()
        if isinstance(t, TopKSignal):
            return t.token_ids[start:stop], t.logprobs[start:stop]
        if isinstance(t, DenseSignal):
            logits = t.logits[start:stop]
            fresh = upcast(logits)
            return (fresh.clone() if writable and fresh is logits else fresh,)
        with torch.no_grad():
            logits = t.hidden[start:stop] @ t.weight.T
            logits = (logits + t.bias) if t.bias is not None else logits
            return (upcast(logits) if writable else logits,)


# Compiled chunk steps, one per (hyperparameters, teacher kind, differentiated arguments).
_COMPILED: dict[tuple, object] = {}


def _chunk_step(plan: _Plan, argnums: tuple[int, ...] | None):
    """The per-chunk callable: value only (argnums None) or gradient and value w.r.t. `argnums`."""
    compiled = plan.mode == "compiled"
    key = (plan.params, plan.teacher_kind, argnums, compiled)
    if key in _COMPILED:
        return _COMPILED[key]
    fn = partial(_chunk_terms, params=plan.params, teacher_kind=plan.teacher_kind)
    if argnums is not None:
        fn = torch.func.grad_and_value(fn, argnums=argnums, has_aux=True)
    if compiled:
        fn = torch.compile(fn, dynamic=False)
    _COMPILED[key] = fn
    return fn


class _ChunkedXKDFunction(torch.autograd.Function):
    """Loss sum of the per-token logit terms (D, CE, TD); gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, mean, log_std, plan: _Plan):  # noqa: D102
        n_rows = hidden.shape[0]
        uses_td = plan.nonterminal is not None
        want = ctx.needs_input_grad if plan.grad_enabled else (False,) * 6
        acc = _accumulation_dtype(hidden)
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if want[0] else None
        grad_weight = torch.zeros_like(weight) if want[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want[2] else None
        grad_mean = torch.zeros_like(mean) if uses_td and want[3] else None
        grad_log_std = torch.zeros_like(log_std) if uses_td and want[4] else None
        needs_logit_grad = want[0] or want[1] or want[2]
        argnums = None
        if needs_logit_grad or grad_mean is not None or grad_log_std is not None:
            argnums = (0, 1, 2) if uses_td else (0,)
        by_hand = plan.mode == "fused" and fused.supports(plan.params, plan.teacher_kind, uses_td)
        step = (
            partial(
                fused.fused_chunk, params=plan.params, teacher_kind=plan.teacher_kind, need_grad=argnums is not None
            )
            if by_hand
            else _chunk_step(plan, argnums)
        )
        sums = torch.zeros(4, dtype=acc, device=hidden.device)
        for start in range(0, n_rows, plan.chunk_size):
            stop = min(start + plan.chunk_size, n_rows)
            ext = min(stop + 1, n_rows) if uses_td else stop  # the look-ahead row for TD_{stop-1}
            rows = hidden[start:ext]
            logits = rows @ weight.T
            if bias is not None:
                logits = logits + bias
            args = (
                upcast(logits),
                mean[start:stop] if uses_td else None,
                log_std[start:stop] if uses_td else None,
                plan.teacher_rows(start, ext, writable=by_hand),
                plan.targets[start:ext],
                plan.valid[start:stop],
                plan.nonterminal[start:ext] if uses_td else None,
            )
            if by_hand:
                grad_logits, grad_m, grad_s, loss, parts = step(*args)
                grads = (grad_logits, grad_m, grad_s)
            elif argnums is None:
                loss, parts = step(*args)
            else:
                grads, (loss, parts) = step(*args)
            if argnums is not None:
                grad_logits = grads[0]
                if want[0]:
                    grad_hidden[start:ext] += grad_logits.to(weight.dtype) @ weight
                if want[1]:
                    grad_weight.addmm_(grad_logits.T.to(rows.dtype), rows)
                if want[2]:
                    grad_bias += grad_logits.sum(0)
                if grad_mean is not None:
                    grad_mean[start:stop] = grads[1]
                if grad_log_std is not None:
                    grad_log_std[start:stop] = grads[2]
            sums += torch.stack([loss, *parts])
            logits = args = grads = grad_logits = None  # free this chunk's (C, V) buffers before the next matmul
        ctx.save_for_backward(
            *(g if g is not None else None for g in (grad_hidden, grad_weight, grad_bias, grad_mean, grad_log_std))
        )
        ctx.input_dtypes = (hidden.dtype, bias.dtype if bias is not None else None)
        loss, div_sum, ce_sum, td_sum = (sums[i].clone() for i in range(4))
        ctx.mark_non_differentiable(div_sum, ce_sum, td_sum)
        return loss, div_sum, ce_sum, td_sum

    @staticmethod
    def backward(ctx, grad_output, *_unused):  # noqa: D102
        hidden_dtype, bias_dtype = ctx.input_dtypes
        grads = list(ctx.saved_tensors)
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        if scaled[0] is not None:
            scaled[0] = scaled[0].to(hidden_dtype)
        if scaled[2] is not None:
            scaled[2] = scaled[2].to(bias_dtype)
        return (*scaled, None)


def _flat_teacher(teacher: ChunkedTeacher | None, vocab_size: int, n_rows: int) -> ChunkedTeacher | None:
    """The teacher with positions flattened to (N, ...) and its vocabulary cut to the student's `vocab_size` rows."""
    if teacher is None:
        return None
    if isinstance(teacher, TopKSignal):
        return TopKSignal(teacher.token_ids.reshape(n_rows, -1), teacher.logprobs.reshape(n_rows, -1))
    if isinstance(teacher, DenseSignal):
        if teacher.logits.shape[-1] < vocab_size:
            raise ValueError(
                f"teacher logits have {teacher.logits.shape[-1]} entries per position but the student's output "
                f"layer has {vocab_size} rows; pass vocab_size=<tokenizer length> to cut both to the shared vocabulary"
            )
        return DenseSignal(teacher.logits[..., :vocab_size].reshape(n_rows, vocab_size))
    if teacher.weight.shape[0] < vocab_size:
        raise ValueError(
            f"teacher output layer has {teacher.weight.shape[0]} rows but the student's has {vocab_size}; pass "
            "vocab_size=<tokenizer length> to cut both to the shared vocabulary"
        )
    bias = teacher.bias[:vocab_size] if teacher.bias is not None else None
    return DenseHiddenSignal(teacher.hidden.reshape(n_rows, -1), teacher.weight[:vocab_size], bias)


def chunked_xkd_loss(
    student_hidden: Tensor,
    output_weight: Tensor,
    labels: Tensor,
    *,
    teacher: ChunkedTeacher | None,
    reward_mean: Tensor | None,
    reward_log_std: Tensor | None,
    params: XKDHyperparams,
    position_ids: Tensor | None = None,
    eos_token_id: int | None = None,
    chunk_size: int = 1024,
    output_bias: Tensor | None = None,
    vocab_size: int | None = None,
    mode: str = "fused",
) -> XKDLossOutput:
    """X-KD loss SUM over response tokens, equal to `xkd_loss(student_hidden @ output_weight.T, ...)`.

    student_hidden (B, T, H): the input of the output layer; output_weight (V', H) and output_bias (V',)
    the student's output layer, cut to its first `vocab_size` rows when given (padded embedding rows);
    labels (B, T) unshifted; teacher: a `DenseHiddenSignal` (teacher hidden states + output layer, its
    logits formed per chunk), a `DenseSignal` or a `TopKSignal`, aligned with the student; reward_mean /
    reward_log_std (B, T) the reward head at every position. Gradients reach student_hidden,
    output_weight (only if it requires grad: a frozen LoRA base layer gets none), output_bias and the
    reward-head outputs. chunk_size positions are processed at a time.

    mode: "fused" (default) uses the hand-written gradients of fused.py where they cover the
    configuration (forward_kl or sequence, any q_form, observed TD target) and
    torch.func autograd per chunk elsewhere; "autograd" always uses autograd; "compiled" runs the
    autograd step under torch.compile (worth it for the other divergences; compiles once per shape).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    p = params
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    if student_hidden.dim() != 3 or labels.shape != student_hidden.shape[:2]:
        raise ValueError(
            f"student_hidden must be (B, T, H) and labels (B, T); got {tuple(student_hidden.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if vocab_size is not None:
        output_weight = output_weight[:vocab_size]
        output_bias = output_bias[:vocab_size] if output_bias is not None else None
    kd_needs_teacher = p.alpha_kd > 0 and p.divergence != "sequence"
    td_needs_teacher = p.uses_reward and p.td_weight > 0 and p.td_target == "teacher_expected"
    teacher_needed = p.needs_teacher
    if teacher is None and kd_needs_teacher:
        raise ValueError(f"divergence {p.divergence!r} needs a teacher signal")
    if teacher is None and td_needs_teacher:
        raise ValueError("td_target 'teacher_expected' needs a teacher signal")
    if p.uses_reward and (reward_mean is None or reward_log_std is None):
        raise ValueError("reward_kl_weight or td_weight > 0 needs the reward head outputs")

    n_rows = labels.numel()
    targets = shift_targets(labels, position_ids, ignore_index=p.ignore_index)
    valid = targets != p.ignore_index
    uses_td = p.uses_reward and p.td_weight > 0
    nonterminal = nonterminal_next(targets, ignore_index=p.ignore_index, eos_token_id=eos_token_id) if uses_td else None
    plan = _Plan(
        params=p,
        teacher=_flat_teacher(teacher, output_weight.shape[0], n_rows) if teacher_needed else None,
        targets=targets.reshape(n_rows),
        valid=valid.reshape(n_rows),
        nonterminal=nonterminal.reshape(n_rows) if uses_td else None,
        chunk_size=chunk_size,
        mode=mode,
        grad_enabled=torch.is_grad_enabled(),
    )

    hidden = student_hidden.reshape(n_rows, -1)
    zero = hidden.new_zeros((), dtype=_accumulation_dtype(hidden))
    mu = log_std = None
    kl_sum = mu_sum = std_sum = zero
    if p.uses_reward:
        mu = align_reward(upcast(reward_mean), p.reward_input)
        log_std = align_reward(upcast(reward_log_std), p.reward_input)
        mu_sum = torch.where(valid, mu, 0.0).sum().detach()
        std_sum = torch.where(valid, log_std.exp(), 0.0).sum().detach()
        if p.reward_kl_weight > 0:
            kl = gaussian_kl_to_prior(mu, log_std, prior_std=p.prior_std)
            kl_sum = torch.where(valid, kl, 0.0).sum()
        mu, log_std = mu.reshape(n_rows), log_std.reshape(n_rows)
    logit_loss, div_sum, ce_sum, td_sum = _ChunkedXKDFunction.apply(
        hidden, output_weight, output_bias, mu, log_std, plan
    )
    return XKDLossOutput(
        loss=logit_loss + p.reward_kl_weight * kl_sum,
        divergence=div_sum,
        ce=ce_sum,
        kl_prior=kl_sum.detach(),
        td_nll=td_sum,
        reward_mean=mu_sum,
        reward_std=std_sum,
        num_tokens=valid.sum(),
    )
