"""Teacher and student distributions over the categories a divergence compares (XKD_METHOD.md 3).

Dense teacher: the full vocabulary at temperature tau. Top-k teacher: the k stored tokens plus one
"tail" category holding the missing mass, for both teacher and student, so that no divergence
silently renormalises the teacher; `tail=False` gives the renormalised top-k variant of other tools.
Imports torch only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from axolotl_xkd.losses.blocks import logsumexp_rows
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.losses.signal import DenseSignal, TeacherSignal, TopKSignal


def masked_logsumexp(values: Tensor, keep: Tensor) -> Tensor:
    """logsumexp of `values` over the last dim where `keep`; -inf (finite gradient) where nothing is kept."""
    any_kept = keep.any(-1)
    safe = torch.where(keep, values, -math.inf)
    # Rows with nothing kept get zeros, so logsumexp's backward never sees an all -inf row.
    safe = torch.where(any_kept.unsqueeze(-1), safe, 0.0)
    return torch.where(any_kept, torch.logsumexp(safe, dim=-1), -math.inf)


def topk_mask(ids: Tensor, valid: Tensor, like: Tensor) -> Tensor:
    """Bool mask shaped like `like`, True at the valid top-k ids.

    Padded slots are redirected to the row's first valid id, so a padded slot whose placeholder id
    equals a real top-k id cannot clear that id's entry (scatter_ keeps whichever write lands last).
    """
    first_valid = ids.gather(-1, valid.int().argmax(-1, keepdim=True)).expand_as(ids)
    any_valid = valid.any(-1, keepdim=True).expand_as(ids)
    return torch.zeros_like(like, dtype=torch.bool).scatter_(-1, torch.where(valid, ids, first_valid), any_valid)


def teacher_topk_categories(signal: TopKSignal, *, temperature: float, tail: bool) -> Tensor:
    """Teacher log-probs over k (+1 tail) categories at temperature tau, (B, T, k[+1])."""
    logprobs = torch.where(signal.valid, upcast(signal.logprobs), -math.inf)
    if tail:
        covered = logprobs.exp().sum(-1, keepdim=True)
        tail_logprob = torch.log((1.0 - covered).clamp(min=0.0))
        logprobs = torch.cat([logprobs, tail_logprob], dim=-1)
    return torch.log_softmax(logprobs / temperature, dim=-1)


def student_topk_categories(student_logprobs: Tensor, signal: TopKSignal, *, tail: bool) -> Tensor:
    """Student log-probs (B, T, V) gathered at the teacher's top-k ids (+ tail), (B, T, k[+1])."""
    valid = signal.valid
    ids = torch.where(valid, signal.token_ids, 0).long()
    gathered = torch.where(valid, student_logprobs.gather(-1, ids), -math.inf)
    if not tail:
        return torch.log_softmax(gathered, dim=-1)
    in_topk = topk_mask(ids, valid, student_logprobs)
    tail_logprob = masked_logsumexp(student_logprobs, ~in_topk)
    return torch.cat([gathered, tail_logprob.unsqueeze(-1)], dim=-1)


def paired_categories(
    student_logprobs: Tensor, teacher: TeacherSignal, *, temperature: float, topk_tail: bool
) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probs over the same categories; student_logprobs is log_softmax(z / tau)."""
    if isinstance(teacher, DenseSignal):
        return student_logprobs, torch.log_softmax(upcast(teacher.logits) / temperature, dim=-1)
    student = student_topk_categories(student_logprobs, teacher, tail=topk_tail)
    teacher_cat = teacher_topk_categories(teacher, temperature=temperature, tail=topk_tail)
    if topk_tail:
        teacher_cat = drop_empty_tail(teacher_cat, torch.isneginf(student[..., -1:]))
    return student, teacher_cat


def drop_empty_tail(teacher_cat: Tensor, empty: Tensor) -> Tensor:
    """The teacher's k + 1 categories with the tail's mass dropped (and the top k renormalised) where `empty`
    (..., 1): the top k cover the whole vocabulary (k = V), so no token is left for the tail. Float16 rounding
    of the stored log-probs must not leave teacher mass there, or KL(p_T || pi) is infinite."""
    no_tail = torch.cat([teacher_cat[..., :-1], torch.full_like(teacher_cat[..., -1:], -math.inf)], dim=-1)
    return torch.where(empty, torch.log_softmax(no_tail, dim=-1), teacher_cat)


TAIL_FLOOR = 2.0**-11
"""Least probability `teacher_token_logprob` gives the tail category: the rounding resolution of a sum of
float16-stored top-k probabilities near 1, below which a tail cannot be told from 0. Without it a token
outside a top k that (rounded) covers everything would get the target -inf."""


def teacher_token_logprob(teacher: TeacherSignal, actions: Tensor, *, temperature: float, topk_tail: bool,
                          vocab_size: int) -> Tensor:
    """log p_T(a_i | s_i) at temperature tau, (N,), for in-vocabulary actions (N,) and a teacher of N rows.

    Dense: log_softmax(z_T / tau)[a_i] = z_T[a_i] / tau - logsumexp(z_T / tau). Top-k: the k (+1 tail)
    categories of `teacher_topk_categories`; an action among the k_i valid ids gets its category's log-prob, any
    other one the tail's probability (0 without the tail), floored at TAIL_FLOOR and spread uniformly over the
    V - k_i tokens outside the top k.
    """
    if isinstance(teacher, DenseSignal):  # log-sum-exp in row blocks: no (N, V) log_softmax copy
        z = teacher.logits
        return upcast(z.gather(-1, actions.unsqueeze(-1)).squeeze(-1)) / temperature - logsumexp_rows(z, temperature)
    categories = teacher_topk_categories(teacher, temperature=temperature, tail=topk_tail)
    valid = teacher.valid
    k = valid.shape[-1]
    hit = valid & (teacher.token_ids == actions.unsqueeze(-1))  # ids are distinct: at most one hit per row
    in_topk = torch.where(hit, categories[..., :k], 0.0).sum(-1)
    tail_prob = categories[..., -1].exp() if topk_tail else torch.zeros_like(in_topk)
    outside = (vocab_size - valid.sum(-1)).clamp(min=1)  # k_i = V: every action is a hit, the value is unused
    in_tail = torch.log(tail_prob.clamp(min=TAIL_FLOOR)) - torch.log(outside.to(in_topk.dtype))
    return torch.where(hit.any(-1), in_topk, in_tail)


def teacher_expectation(values: Tensor, student_logprobs: Tensor, teacher: TeacherSignal, *,
                        temperature: float, topk_tail: bool) -> Tensor:
    """E_{a ~ p_T(.|s_i)} values[..., a], (B, T).

    For a top-k teacher the tail category's value is the student-weighted mean of `values` over
    the tokens outside the top k (the teacher's shape inside its tail is unknown).
    """
    if isinstance(teacher, DenseSignal):
        probs = torch.softmax(upcast(teacher.logits) / temperature, dim=-1)
        return (probs * values).sum(-1)
    probs = teacher_topk_categories(teacher, temperature=temperature, tail=topk_tail).exp()
    valid = teacher.valid
    ids = torch.where(valid, teacher.token_ids, 0).long()
    topk_values = torch.where(valid, values.gather(-1, ids), 0.0)
    expectation = (probs[..., : ids.shape[-1]] * topk_values).sum(-1)
    if topk_tail:
        in_topk = topk_mask(ids, valid, values)
        weights = torch.where(in_topk, 0.0, student_logprobs.exp())
        tail_mass = weights.sum(-1)
        tail_value = (weights * values).sum(-1) / tail_mass.clamp(min=torch.finfo(values.dtype).tiny)
        expectation = expectation + probs[..., -1] * tail_value
    return expectation
