"""The X-KD loss of xkd.py, fused with the student's output layer and computed a chunk of positions at a time.

`chunked_xkd_loss` takes the student's last hidden states and output layer instead of logits, so the full (N, V)
student logits (and, with a `DenseHiddenSignal` or a `MixedSignal` of several teachers, the teachers') never exist:
each chunk of C positions forms its (C, V) logits, computes the per-token terms with the same `xkd.token_terms` that
xkd_loss calls on all rows (or fused.py's hand-written gradients of it), and turns them into gradients for the hidden
states, the output layer and the reward-head outputs before the next chunk starts (the Liger pattern: gradients are
produced in the forward pass and only scaled in the backward pass, which is why there are no second derivatives).

The TD term couples position i with i+1 (Q(s'_i, a'_i), or V(s'_i) for td_target soft, is read at i+1). A chunk of rows
[s, e) therefore also forms the logits of row e (one look-ahead row, ~1/C extra work) so that TD_{e-1}
and its gradient, which flows into row e too, are complete inside the chunk. Positions are flattened
(B, T) -> (N,) after the terminal flags are computed on (B, T), and the last position of every row and
of every packed segment is terminal, so no TD pair crosses a row or a segment. Where no TD pair reads the next row
(no TD term, or a fixed target such as the default teacher_logprob), only the rows the loss counts go through the
output layer: the prompt's logits are never formed (Axolotl's SFT forms them and masks them).

Why not `LigerFusedLinearDistillationBase`: it splits inputs with `torch.chunk` into independent
chunks (no look-ahead row for the TD pair), passes no per-position tensors besides the labels (the
reward-head outputs, terminal flags and top-k teacher rows have no slot), always builds the output
layer's gradient (a frozen LoRA base layer must not get one), and divides by the token count (X-KD
returns sums). The loop below keeps its shape: one closure accumulates a chunk's gradients
(`torch.func.grad_and_value` of `token_terms`, or fused.py's), called once per chunk. Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from axolotl_xkd.losses import fused
from axolotl_xkd.losses.mixed import MixedSignal
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.losses.signal import DenseHiddenSignal, DenseSignal, TeacherSignal, TopKSignal
from axolotl_xkd.losses.xkd import (
    Positions,
    RowInputs,
    XKDHyperparams,
    XKDLossOutput,
    loss_output,
    prepare,
    term_forces,
    token_terms,
)
from axolotl_xkd.options import DEFAULT_CHUNK_SIZE

ChunkedTeacher = DenseHiddenSignal | DenseSignal | TopKSignal | MixedSignal
MODES = ("fused", "autograd")


def _accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, else the input's own (float32 or float64)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Plan:
    """What the autograd Function needs besides its differentiable inputs; per-position tensors are flat (N, ...)."""

    params: XKDHyperparams
    teacher: ChunkedTeacher | None
    positions: Positions
    chunk_size: int
    mode: str
    grad_enabled: bool  # Function.forward sees needs_input_grad True even under no_grad (evaluation)
    forces: bool = False  # measure the terms' pulls on the first chunk's logits (xkd.term_forces)

    @property
    def teacher_kind(self) -> str:
        """"none", or the signal's kind ("dense", "topk"): which math fused.py's hand-written gradients use."""
        return "none" if self.teacher is None else self.teacher.kind

    def teacher_rows(self, start: int, stop: int, *, writable: bool = False) -> TeacherSignal | None:
        """The teacher for flat positions [start, stop), as the per-token terms read it (`formed`: a
        DenseHiddenSignal's logits formed here). writable: dense logits come as a fresh, at least float32 tensor
        the caller may overwrite."""
        if self.teacher is None:
            return None
        return self.teacher.rows(slice(start, stop)).formed(writable=writable)


def _chunk_step(plan: _Plan, argnums: tuple[int, ...] | None):
    """The per-chunk `token_terms`: value only (argnums None) or gradient and value w.r.t. `argnums`."""
    fn = partial(token_terms, params=plan.params)
    return fn if argnums is None else torch.func.grad_and_value(fn, argnums=argnums, has_aux=True)


def _grad_buffers(want, uses_td: bool, hidden: Tensor, weight: Tensor, bias: Tensor | None, mu: Tensor | None,
                  log_sigma: Tensor | None) -> tuple[Tensor | None, ...]:
    """Zeroed gradient buffers of hidden, weight, bias, mu and log_sigma, each None where no gradient is wanted
    (the reward-head outputs get one only with a TD term); hidden's and bias's at least in float32."""
    acc = _accumulation_dtype(hidden)
    return (
        torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if want[0] else None,
        torch.zeros_like(weight) if want[1] else None,
        torch.zeros(bias.shape, dtype=acc, device=bias.device) if want[2] else None,
        torch.zeros_like(mu) if uses_td and want[3] else None,
        torch.zeros_like(log_sigma) if uses_td and want[4] else None,
    )


def _run_step(step, args: tuple, *, by_hand: bool, with_grad: bool) -> tuple[tuple | None, Tensor, Tensor]:
    """One chunk's step, either kind: (gradients of the logits, mu, log_sigma, or None without them; loss; parts)."""
    if by_hand:
        grad_logits, grad_m, grad_s, loss, parts = step(*args)
        return ((grad_logits, grad_m, grad_s) if with_grad else None), loss, parts
    if not with_grad:
        loss, parts = step(*args)
        return None, loss, parts
    grads, (loss, parts) = step(*args)
    return grads, loss, parts


class _ChunkedXKDFunction(torch.autograd.Function):
    """Loss sum of the per-token logit terms (D, CE, TD); gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, mu, log_sigma, plan: _Plan):
        n_rows = hidden.shape[0]
        pos = plan.positions
        uses_td = pos.nonterminal is not None
        # TD_{stop-1} reads row `stop`, except with a fixed target: then each chunk's rows are exactly those of the
        # loss without TD, and so are its gradients for them.
        look_ahead = uses_td and not plan.params.fixed_td_target
        want = ctx.needs_input_grad if plan.grad_enabled else (False,) * 6
        acc = _accumulation_dtype(hidden)
        grad_hidden, grad_weight, grad_bias, grad_mu, grad_log_sigma = _grad_buffers(
            want, uses_td, hidden, weight, bias, mu, log_sigma)
        argnums = None
        if any(want[:3]) or grad_mu is not None or grad_log_sigma is not None:
            argnums = (0, 1, 2) if uses_td else (0,)
        by_hand = plan.mode == "fused" and fused.supports(plan.params, plan.teacher_kind, uses_td)
        step = (
            partial(fused.fused_chunk, params=plan.params, need_grad=argnums is not None)
            if by_hand
            else _chunk_step(plan, argnums)
        )
        sums = torch.zeros(4, dtype=acc, device=hidden.device)
        pulls = torch.zeros(3, dtype=acc, device=hidden.device)

        def accumulate_chunk(start: int, stop: int) -> Tensor | None:
            """Add rows [start, stop)'s loss and parts to `sums` and their gradients to the buffers; returns the
            terms' pulls on the first chunk's logits when they are measured. Its (C, V) buffers are freed when it
            returns, before the next chunk's matmul."""
            ext = min(stop + 1, n_rows) if look_ahead else stop  # the look-ahead row for TD_{stop-1}
            rows = hidden[start:ext]
            logits = rows @ weight.T
            if bias is not None:
                logits = logits + bias
            rows_in = RowInputs(
                plan.teacher_rows(start, ext, writable=by_hand),
                pos.targets[start:ext],
                pos.valid[start:stop],
                pos.nonterminal[start:ext] if uses_td else None,
            )
            args = (upcast(logits), mu[start:stop] if uses_td else None, log_sigma[start:stop] if uses_td else None,
                    rows_in)
            measured = None
            if plan.forces and start == 0:  # before the fused step overwrites the logits and the teacher's buffer
                measured = term_forces(*args[:3], rows_in, params=plan.params)
            grads, loss, parts = _run_step(step, args, by_hand=by_hand, with_grad=argnums is not None)
            if grads is not None:
                grad_logits = grads[0]
                if want[0]:
                    grad_hidden[start:ext] += grad_logits.to(weight.dtype) @ weight
                if want[1]:
                    grad_weight.addmm_(grad_logits.T.to(rows.dtype), rows)
                if want[2]:
                    grad_bias.add_(grad_logits.sum(0))
                if grad_mu is not None:
                    grad_mu[start:stop] = grads[1]
                if grad_log_sigma is not None:
                    grad_log_sigma[start:stop] = grads[2]
            sums.add_(torch.stack([loss, *parts]))
            return measured

        for start in range(0, n_rows, plan.chunk_size):
            measured = accumulate_chunk(start, min(start + plan.chunk_size, n_rows))
            pulls = pulls if measured is None else measured
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_mu, grad_log_sigma)
        ctx.input_dtypes = (hidden.dtype, bias.dtype if bias is not None else None)
        loss, div_sum, ce_sum, td_sum = (sums[i].clone() for i in range(4))
        ctx.mark_non_differentiable(div_sum, ce_sum, td_sum, pulls)
        return loss, div_sum, ce_sum, td_sum, pulls

    @staticmethod
    def backward(ctx, grad_output, *_unused):
        if torch.is_grad_enabled():
            # Double backward (create_graph=True: gradgradcheck, gradient penalties) would differentiate the
            # stored gradients as constants and return wrong second derivatives without a word.
            raise RuntimeError(
                "chunked_xkd_loss computes its gradients during the forward pass and stores them without a graph, "
                "so it has no second derivatives: backward with create_graph=True is not supported. Use xkd_loss "
                "on the full logits where second derivatives are needed."
            )
        hidden_dtype, bias_dtype = ctx.input_dtypes
        grads = list(ctx.saved_tensors)
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        if scaled[0] is not None:
            scaled[0] = scaled[0].to(hidden_dtype)
        if scaled[2] is not None:
            scaled[2] = scaled[2].to(bias_dtype)
        return (*scaled, None)


def _counted_rows(positions: Positions, params: XKDHyperparams) -> Tensor | None:
    """The flat rows the loss counts, where every term of a row reads that row alone (no TD term, or a fixed TD
    target: no TD pair with the next row); None where every row counts or a TD pair reads the next row."""
    if positions.nonterminal is not None and not params.fixed_td_target:
        return None
    keep = positions.valid.nonzero().squeeze(-1)
    return None if keep.numel() == positions.valid.numel() else keep


def _check_arguments(student_hidden: Tensor, labels: Tensor, *, chunk_size: int, mode: str) -> None:
    """Refuse a mode, chunk size or pair of shapes chunked_xkd_loss cannot use."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    if student_hidden.dim() != 3 or labels.shape != student_hidden.shape[:2]:
        raise ValueError(
            f"student_hidden must be (B, T, H) and labels (B, T); got {tuple(student_hidden.shape)} and "
            f"{tuple(labels.shape)}"
        )


def chunked_xkd_loss(
    student_hidden: Tensor,
    output_weight: Tensor,
    labels: Tensor,
    *,
    teacher: ChunkedTeacher | None,
    params: XKDHyperparams,
    mu: Tensor | None,
    log_sigma: Tensor | None,
    position_ids: Tensor | None = None,
    eos_token_id: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    output_bias: Tensor | None = None,
    vocab_size: int | None = None,
    mode: str = "fused",
    forces: bool = False,
) -> XKDLossOutput:
    """X-KD loss SUM over response tokens, equal to `xkd_loss(student_hidden @ output_weight.T, ...)`.

    student_hidden (B, T, H): the input of the output layer; output_weight (V', H) and output_bias (V',)
    the student's output layer; vocab_size, when given, cuts it and a dense teacher's logits or output layer
    to their first vocab_size rows (padded embedding rows); without it a dense teacher must have the student's
    V' tokens, as in xkd_loss. labels (B, T) unshifted; teacher: a `DenseHiddenSignal` (teacher hidden
    states + output layer, its logits formed per chunk), a `MixedSignal` (several teachers mixed per chunk), a
    `DenseSignal` or a `TopKSignal`, aligned with the student; mu / log_sigma (B, T) the reward head at every
    position. Gradients reach student_hidden, output_weight (only if it requires grad: a frozen LoRA base layer gets none), output_bias
    and the reward-head outputs; first derivatives only (no create_graph). chunk_size positions at a time.

    mode: "fused" (default) uses the hand-written gradients of fused.py where they cover the
    configuration (`fused.supports`) and torch.func autograd of `token_terms` per chunk elsewhere;
    "autograd" always uses autograd. (A torch.compile'd autograd step was measured slower than "fused" and at
    3.5-4.6x its peak memory, benchmarks/results/loss_memory.md, and removed.)

    forces: also measure the terms' pulls on the logits of the first chunk (xkd.term_forces; one autograd pass per
    term over one chunk, so the trainer asks for it on logging steps only).
    """
    _check_arguments(student_hidden, labels, chunk_size=chunk_size, mode=mode)
    p = params
    if vocab_size is not None:
        output_weight = output_weight[:vocab_size]
        output_bias = output_bias[:vocab_size] if output_bias is not None else None
        teacher = teacher.cut(vocab_size) if teacher is not None else None
    n_rows = labels.numel()
    positions, flat = prepare(labels, teacher, mu, log_sigma, params=p,
                              vocab_size=output_weight.shape[0], position_ids=position_ids, eos_token_id=eos_token_id)
    rows, counted = student_hidden.reshape(n_rows, student_hidden.shape[-1]), positions
    keep = _counted_rows(positions, p)
    if keep is not None:  # only the counted rows need logits: the prompt's are never formed
        rows, flat = rows.index_select(0, keep), None if flat is None else flat.rows(keep)
        counted = Positions(*(None if t is None else t[keep] for t in positions))
    plan = _Plan(
        params=p,
        teacher=flat,
        positions=counted,
        chunk_size=chunk_size,
        mode=mode,
        grad_enabled=torch.is_grad_enabled(),
        forces=forces,
    )
    logit_loss, div_sum, ce_sum, td_sum, pulls = _ChunkedXKDFunction.apply(
        rows, output_weight, output_bias, counted.mu, counted.log_sigma, plan
    )
    return loss_output(logit_loss, (div_sum, ce_sum, td_sum), positions, params=p, forces=pulls if forces else None)
