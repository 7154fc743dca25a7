"""Several teachers' distributions mixed into one (`xkd.teachers` with `xkd.mixture`): the weights and the mixture
of probabilities p_M(u) = sum_j W_ij p_j(u) (docs/teachers.md#many-teachers), and `MixedSignal`, the teachers'
signals with what weighs them, mixed a block of positions at a time where the loss reads them (`formed`).

A mixed signal is what makes a mixture fusable: a teacher given as its hidden states and output layer forms its
logits a chunk at a time inside the chunked loss, as one teacher does, so no teacher's (B, T, V) logits exist and
under `route` each position goes through its own teacher's output layer only. Torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from axolotl_xkd.losses.categories import teacher_token_logprob
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.losses.signal import DenseHiddenSignal, DenseSignal, Index, TeacherSignal, TopKSignal

Member = DenseHiddenSignal | DenseSignal | TopKSignal


@dataclass(frozen=True)
class LogProbs(DenseSignal):
    """A dense signal whose logits are already log-probabilities (log_softmax taken once, then read by the weights and
    the mixture without another pass over the vocabulary)."""

    def rows(self, index) -> LogProbs:
        return LogProbs(self.logits[index])

    def flat(self) -> LogProbs:
        return LogProbs(self.logits.reshape(-1, self.vocab_size))


@dataclass(frozen=True)
class MixRule:
    """How a mixture weighs its teachers: `xkd.mixture`, each teacher's weight, the student's vocabulary (over which a
    top-k teacher's tail is spread), the ids a dense teacher lists in a top-k mixture, and `confidence`'s score and
    temperature."""

    mixture: str
    weights: tuple[float, ...]
    vocab_size: int
    top_k: int = 64
    score: str = "logprob"
    temperature: float = 1.0


def log_probs(signal: TeacherSignal) -> TeacherSignal:
    """A dense signal as `LogProbs` (a top-k record is log-probs already)."""
    if isinstance(signal, DenseSignal) and not isinstance(signal, LogProbs):
        return LogProbs(torch.log_softmax(upcast(signal.logits), dim=-1))
    return signal


def available(signal: TeacherSignal) -> Tensor:
    """(...) bool: where the teacher has a distribution (a dense one everywhere, a top-k one where any slot holds an
    entry; cross-tokenizer coverage gaps are empty records)."""
    if isinstance(signal, DenseSignal):
        return torch.ones(signal.logits.shape[:-1], dtype=torch.bool, device=signal.logits.device)
    return torch.isfinite(signal.logprobs).any(-1)


def next_token_logprob(signal: TeacherSignal, next_ids: Tensor, vocab_size: int) -> Tensor:
    """(...) log p_j(u_{i+1} | u_<=i), the teacher's log-prob of the observed next token; a top-k teacher's unlisted
    token gets its tail spread evenly over the unlisted vocabulary (`categories.teacher_token_logprob`)."""
    if isinstance(signal, LogProbs):
        return upcast(signal.logits).gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
    return teacher_token_logprob(signal.flat(), next_ids.reshape(-1), temperature=1.0, topk_tail=True,
                                 vocab_size=vocab_size).reshape(next_ids.shape)


def neg_entropy(signal: TeacherSignal) -> Tensor:
    """(...) minus the teacher's entropy: over the whole vocabulary (dense), or over its listed entries and its tail
    taken as one category (top-k; a lower bound of the entropy)."""
    if isinstance(signal, DenseSignal):
        logp = log_probs(signal).logits
        return (logp.exp() * logp).sum(-1)
    logp = upcast(signal.logprobs)
    listed = torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0).sum(-1)
    tail = (1 - torch.where(torch.isfinite(logp), logp.exp(), 0.0).sum(-1)).clamp(min=0)
    return listed + torch.where(tail > 0, tail * tail.clamp(min=1e-30).log(), 0.0)


def log_weights(signals: list[TeacherSignal | None], rule: MixRule, *, shape: torch.Size, route: Tensor | None = None,
                next_ids: Tensor | None = None) -> Tensor:
    """(..., n) log W_ij over the positions `shape`, normalised over the teachers available at each position (-inf
    where none is; a None signal is a teacher asked nothing there).

    route: 1 on the teacher `route` (...) names (-1: none); weighted: w_j / sum of the available w; confidence:
    softmax_j(score_ij / temperature + log w_j) over the available teachers.
    """
    first = upcast(next(values_of(s) for s in signals if s is not None))
    device, dtype = first.device, first.dtype
    have = torch.stack([available(s) if s is not None else torch.zeros(shape, dtype=torch.bool, device=device)
                        for s in signals], dim=-1)
    if rule.mixture == "route":
        raw = route_log_weights(route.to(device), len(signals)).to(dtype)
    else:
        raw = torch.log(torch.tensor(rule.weights, dtype=dtype, device=device)).expand(have.shape)
        if rule.mixture == "confidence":
            scores = [torch.zeros(shape, dtype=dtype, device=device) if s is None else
                      next_token_logprob(s, next_ids.to(device), rule.vocab_size) if rule.score == "logprob" else
                      neg_entropy(s) for s in signals]
            raw = raw + torch.stack(scores, dim=-1).to(dtype) / rule.temperature
    raw = torch.where(have, raw, -math.inf)
    total = torch.logsumexp(raw, dim=-1, keepdim=True)
    return torch.where(torch.isfinite(total), raw - total, -math.inf)


def route_log_weights(route: Tensor, n: int) -> Tensor:
    """(..., n) log-weights of `route` (...): 0 for the teacher each position names, -inf for the others (all -inf
    where it names none, -1)."""
    return torch.where(route.unsqueeze(-1) == torch.arange(n, device=route.device), 0.0, -math.inf)


def mix(signals: list[TeacherSignal | None], log_w: Tensor, *, top_k: int) -> TeacherSignal:
    """The signal of p_M = sum_j W_j p_j (a None signal: a teacher with weight 0 everywhere, left out). Dense
    teachers only: dense log p_M (zero logits where no teacher has weight). Otherwise a top-k signal over the union of
    the teachers' listed ids (a dense teacher lists its `top_k` most likely), each id once, with log p_M(u) =
    logsumexp_j(log W_j + log p_j(u)), where a top-k teacher's p_j(u) is 0 for an id it does not list (its mass there
    stays in its tail) and a dense one's is exact."""
    present = [(j, s) for j, s in enumerate(signals) if s is not None]
    if all(isinstance(s, DenseSignal) for _, s in present):
        total = None
        for j, signal in present:
            mine = not isinstance(signal, LogProbs)  # a log_softmax made here is ours to overwrite
            term = log_probs(signal).logits
            term = term.add_(log_w[..., j : j + 1]) if mine else term + log_w[..., j : j + 1]
            total = term if total is None else torch.logaddexp(total, term, out=total)
        return DenseSignal(total.masked_fill_(~torch.isfinite(log_w).any(-1, keepdim=True), 0.0))  # total is ours
    dense_logp = [log_probs(s).logits if isinstance(s, DenseSignal) else None for _, s in present]
    listed = [_listed(s, logp, top_k) for (_, s), logp in zip(present, dense_logp)]
    union = torch.cat([ids for ids, _ in listed], dim=-1)
    union_valid = torch.cat([torch.isfinite(lp) for _, lp in listed], dim=-1)
    union_valid &= ~_repeated(union, union_valid)
    safe = torch.where(union_valid, union, 0)
    total = torch.full(union.shape, -math.inf, dtype=log_w.dtype, device=union.device)
    for (j, _), (ids, lp), logp in zip(present, listed, dense_logp):
        at_union = logp.gather(-1, safe) if logp is not None else _lookup(ids, lp, safe)
        total = torch.logaddexp(total, log_w[..., j : j + 1] + at_union.to(log_w.dtype))
    total = torch.where(union_valid, total, -math.inf)
    return TopKSignal(token_ids=safe, logprobs=total)


@dataclass(frozen=True)
class MixedSignal:
    """Named teachers' signals over the same positions (None: a teacher asked nothing) and what weighs them, mixed
    where they are read: `formed` on a block of rows forms each teacher's logits there (a `DenseHiddenSignal`'s
    output layer on those rows only), takes the weights and mixes, so the chunked loss mixes a chunk at a time.

    route (...) names each position's teacher (`route` only; -1: none); next_ids (...) the observed next tokens
    (`confidence` with the logprob score). `seen` (P, n) and `where` (...): where given, `formed` writes each formed
    position's weights W_i into row where[i] of `seen` (the mixture's logged shares); writing a row twice (a chunk's
    look-ahead row) writes the same values.
    """

    members: tuple[Member | None, ...]
    rule: MixRule
    route: Tensor | None = None
    next_ids: Tensor | None = None
    seen: Tensor | None = None
    where: Tensor | None = None

    @property
    def _present(self) -> list[Member]:
        return [m for m in self.members if m is not None]

    @property
    def kind(self) -> str:
        """"dense" when every teacher asked is dense (the mixture is exact over the vocabulary), else "topk"."""
        return "dense" if all(m.kind == "dense" for m in self._present) else "topk"

    @property
    def positions(self) -> torch.Size:
        """The leading shape, (B, T) or (N,)."""
        return self._present[0].positions

    @property
    def vocab_size(self) -> int | None:
        """The dense teachers' vocabulary (None for a top-k mixture)."""
        return self._present[0].vocab_size if self.kind == "dense" else None

    def _each(self, of_member, of_tensor=None) -> MixedSignal:
        """This signal with `of_member` applied to each teacher's signal and `of_tensor` to each per-position tensor
        (route, next ids, where; kept as they are without it)."""
        def part(t):
            return t if t is None or of_tensor is None else of_tensor(t)
        return MixedSignal(tuple(None if m is None else of_member(m) for m in self.members), self.rule,
                           part(self.route), part(self.next_ids), self.seen, part(self.where))

    def rows(self, index: Index) -> MixedSignal:
        """The signal at positions `index`."""
        return self._each(lambda m: m.rows(index), lambda t: t[index])

    def flat(self) -> MixedSignal:
        """The positions flattened, (N, ...)."""
        return self._each(lambda m: m.flat(), lambda t: t.reshape(-1))

    def cut(self, vocab_size: int) -> MixedSignal:
        """Each dense teacher cut to its first `vocab_size` tokens."""
        return self._each(lambda m: m.cut(vocab_size))

    @torch.no_grad()
    def formed(self, *, writable: bool = False) -> TeacherSignal:
        """The mixture at these positions: dense log p_M (under `route` each position's teacher's own logits, which
        the loss normalises: exact), or a top-k signal over the union of the teachers' ids. Always a fresh tensor."""
        if self.rule.mixture == "route" and self.kind == "dense":
            return self._routed()
        signals = [None if m is None else log_probs(m.formed()) for m in self.members]
        log_w = log_weights(signals, self.rule, shape=self.positions, route=self.route, next_ids=self.next_ids)
        self._note(log_w.exp())
        return mix(signals, log_w, top_k=self.rule.top_k)

    def _routed(self) -> DenseSignal:
        """`route` over dense teachers: each position's teacher's logits, formed on its positions only (zero where a
        position names no teacher)."""
        route = self.route
        self._note(torch.exp(route_log_weights(route, len(self.members))))
        owners = [j for j, m in enumerate(self.members) if m is not None and bool((route == j).any())]
        if len(owners) == 1 and bool((route == owners[0]).all()):  # a block wholly one teacher's: no placing
            return self.members[owners[0]].formed(writable=True)
        out = None
        for j in owners:
            at = (route == j).nonzero(as_tuple=True)
            logits = upcast(self.members[j].rows(at).formed().logits)
            if out is None:
                out = logits.new_zeros((*route.shape, logits.shape[-1]))
            out[at] = logits
        if out is None:
            return DenseSignal(torch.zeros((*route.shape, self.vocab_size), device=route.device))
        return DenseSignal(out)

    def _note(self, weights: Tensor) -> None:
        """Write the weights (..., n) of these positions into `seen` (where given)."""
        if self.seen is not None:
            self.seen[self.where.to(self.seen.device)] = weights.to(self.seen)


def values_of(signal: Member) -> Tensor:
    """The per-position tensor of a signal (where its device is): hidden states, dense logits or top-k log-probs."""
    if isinstance(signal, DenseHiddenSignal):
        return signal.hidden
    return signal.logits if isinstance(signal, DenseSignal) else signal.logprobs


def _listed(signal: TeacherSignal, dense_logp: Tensor | None, top_k: int) -> tuple[Tensor, Tensor]:
    """(ids, log-probs) a teacher lists: a top-k record as it is, a dense teacher's `top_k` most likely."""
    if dense_logp is None:
        return signal.token_ids, upcast(signal.logprobs)
    values, ids = dense_logp.topk(min(top_k, dense_logp.shape[-1]), dim=-1)
    return ids, values


def _repeated(ids: Tensor, valid: Tensor) -> Tensor:
    """(..., U) bool: True at a valid slot whose id an earlier valid slot of the same position holds (a stable sort
    puts the earliest of equal ids first)."""
    slots = torch.arange(ids.shape[-1], device=ids.device)
    keyed = torch.where(valid, ids, -1 - slots)  # empty slots: distinct negative keys, never equal to an id
    sorted_ids, order = keyed.sort(dim=-1, stable=True)
    again = torch.zeros_like(valid)
    again[..., 1:] = sorted_ids[..., 1:] == sorted_ids[..., :-1]
    return torch.zeros_like(valid).scatter(-1, order, again)


def _lookup(ids: Tensor, logprobs: Tensor, query: Tensor) -> Tensor:
    """log p_j at the ids `query` (..., U) of a top-k record (ids, logprobs) (..., k): the listed log-prob, -inf for
    an id not listed (ids of a record are distinct)."""
    keyed = torch.where(torch.isfinite(logprobs), ids, -1)
    order = keyed.argsort(dim=-1)
    sorted_ids = keyed.gather(-1, order)
    at = torch.searchsorted(sorted_ids.contiguous(), query.contiguous()).clamp(max=ids.shape[-1] - 1)
    found = sorted_ids.gather(-1, at) == query
    values = logprobs.gather(-1, order.gather(-1, at))
    return torch.where(found, values, -math.inf)
