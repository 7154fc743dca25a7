"""Several teachers as one (`xkd.teachers` with `xkd.mixture`): each named teacher source gives its signal in student
ids (after any cross-tokenizer projection), and this module mixes them into the one signal the loss reads.

The mixture is one of probabilities, at temperature 1 like every teacher record: at position i,
p_M(u) = sum_j W_ij p_j(u), with weights W_ij >= 0 summing to 1 over the teachers that have a distribution there
(docs/teachers.md#many-teachers has the math and what each `mixture` makes of W). Teachers of the student's
tokenizer run in this process give the whole vocabulary, so a mixture of those only is a dense signal; otherwise it
is a top-k signal over the union of the teachers' listed ids, each teacher's unlisted mass left in the tail.
Imports torch, the loss's signal types and the teacher-source contract; nothing of Axolotl or the trainer.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from axolotl_xkd.keys import ROUTE, TEACHER_TICKET
from axolotl_xkd.losses.categories import teacher_token_logprob
from axolotl_xkd.losses.positions import response_mask
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.losses.signal import DenseSignal, TeacherSignal, TopKSignal
from axolotl_xkd.teachers.base import TeacherSource
from axolotl_xkd.teachers.server import Lookahead

MIXTURE_TICKET = TEACHER_TICKET + "_mixture"
"""Batch key of a batch's pending mixture work (its routed sub-batches)."""
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
"""The batch keys a teacher source reads; a routed teacher gets these rows of them."""


@dataclass(frozen=True)
class LogProbs(DenseSignal):
    """A dense signal whose logits are already log-probabilities (log_softmax taken once, then read by the weights and
    the mixture without another pass over the vocabulary)."""

    def rows(self, index) -> LogProbs:
        return LogProbs(self.logits[index])

    def flat(self) -> LogProbs:
        return LogProbs(self.logits.reshape(-1, self.vocab_size))


def log_probs(signal: TeacherSignal) -> TeacherSignal:
    """A dense signal as `LogProbs` (a top-k record is log-probs already)."""
    if isinstance(signal, DenseSignal) and not isinstance(signal, LogProbs):
        return LogProbs(torch.log_softmax(upcast(signal.logits), dim=-1))
    return signal


@dataclass(frozen=True)
class Member:
    """One named teacher of a mixture."""

    name: str
    source: TeacherSource
    weight: float = 1.0


def available(signal: TeacherSignal) -> Tensor:
    """(B, T) bool: where the teacher has a distribution (a dense one everywhere, a top-k one where any slot holds an
    entry; cross-tokenizer coverage gaps are empty records)."""
    if isinstance(signal, DenseSignal):
        return torch.ones(signal.logits.shape[:-1], dtype=torch.bool, device=signal.logits.device)
    return torch.isfinite(signal.logprobs).any(-1)


def next_token_logprob(signal: TeacherSignal, next_ids: Tensor, vocab_size: int) -> Tensor:
    """(B, T) log p_j(u_{i+1} | u_<=i), the teacher's log-prob of the observed next token; a top-k teacher's unlisted
    token gets its tail spread evenly over the unlisted vocabulary (`categories.teacher_token_logprob`)."""
    if isinstance(signal, LogProbs):
        return upcast(signal.logits).gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
    return teacher_token_logprob(signal.flat(), next_ids.reshape(-1), temperature=1.0, topk_tail=True,
                                 vocab_size=vocab_size).reshape(next_ids.shape)


def neg_entropy(signal: TeacherSignal) -> Tensor:
    """(B, T) minus the teacher's entropy: over the whole vocabulary (dense), or over its listed entries and its tail
    taken as one category (top-k; a lower bound of the entropy)."""
    if isinstance(signal, DenseSignal):
        logp = log_probs(signal).logits
        return (logp.exp() * logp).sum(-1)
    logp = upcast(signal.logprobs)
    listed = torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0).sum(-1)
    tail = (1 - torch.where(torch.isfinite(logp), logp.exp(), 0.0).sum(-1)).clamp(min=0)
    return listed + torch.where(tail > 0, tail * tail.clamp(min=1e-30).log(), 0.0)


def log_weights(mixture: str, signals: list[TeacherSignal | None], weights: list[float], *, shape: torch.Size,
                route: Tensor | None = None, next_ids: Tensor | None = None, vocab_size: int | None = None,
                score: str = "logprob", temperature: float = 1.0) -> Tensor:
    """(B, T, n) log W_ij over the (B, T) positions `shape`, normalised over the teachers available at each position
    (-inf where none is; a None signal is a teacher asked nothing for this batch).

    route: 1 on the teacher `route` (B, T) names (-1: none); weighted: w_j / sum of the available w; confidence:
    softmax_j(score_ij / temperature + log w_j) over the available teachers.
    """
    first = upcast(next(_values(s) for s in signals if s is not None))
    device, dtype = first.device, first.dtype
    have = torch.stack([available(s) if s is not None else torch.zeros(shape, dtype=torch.bool, device=device)
                        for s in signals], dim=-1)
    if mixture == "route":
        raw = route_log_weights(route.to(device), len(signals)).to(dtype)
    else:
        raw = torch.log(torch.tensor(weights, dtype=dtype, device=device)).expand(have.shape)
        if mixture == "confidence":
            scores = [torch.zeros(shape, dtype=dtype, device=device) if s is None else
                      next_token_logprob(s, next_ids.to(device), vocab_size) if score == "logprob" else neg_entropy(s)
                      for s in signals]
            raw = raw + torch.stack(scores, dim=-1).to(dtype) / temperature
    raw = torch.where(have, raw, -math.inf)
    total = torch.logsumexp(raw, dim=-1, keepdim=True)
    return torch.where(torch.isfinite(total), raw - total, -math.inf)


def route_log_weights(route: Tensor, n: int) -> Tensor:
    """(..., n) log-weights of `route` (...): 0 for the teacher each position names, -inf for the others (all -inf
    where it names none, -1)."""
    return torch.where(route.unsqueeze(-1) == torch.arange(n, device=route.device), 0.0, -math.inf)


def mix(signals: list[TeacherSignal | None], log_w: Tensor, *, top_k: int) -> TeacherSignal:
    """The signal of p_M = sum_j W_j p_j (a None signal: a teacher with weight 0 everywhere, left out). Dense
    teachers only: dense log p_M. Otherwise a top-k signal over the union of the teachers' listed ids (a dense teacher
    lists its `top_k` most likely), each id once, with log p_M(u) = logsumexp_j(log W_j + log p_j(u)), where a top-k
    teacher's p_j(u) is 0 for an id it does not list (its mass there stays in its tail) and a dense one's is exact."""
    present = [(j, s) for j, s in enumerate(signals) if s is not None]
    if all(isinstance(s, DenseSignal) for _, s in present):
        total = None
        for j, signal in present:
            term = log_w[..., j : j + 1] + log_probs(signal).logits
            total = term if total is None else torch.logaddexp(total, term, out=total)
        return DenseSignal(logits=total)
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


def _values(signal: TeacherSignal) -> Tensor:
    """The per-position values of a signal: dense logits or top-k log-probs."""
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


class MixtureTeacherSource(TeacherSource):
    """Named teacher sources mixed into one signal: `route` runs each teacher on the rows routed to it only (the
    batch's `keys.ROUTE` column), `weighted` and `confidence` run every teacher on the whole batch."""

    def __init__(self, members: list[Member], *, mixture: str, vocab_size: int, top_k: int,
                 score: str = "logprob", temperature: float = 1.0) -> None:
        self.members, self.mixture, self.vocab_size, self.top_k = members, mixture, vocab_size, top_k
        self.score, self.temperature = score, temperature  # of `confidence`
        for member in members:  # several servers tag the same batch: each under its own key
            if hasattr(member.source, "ticket_key"):
                member.source.ticket_key = f"{TEACHER_TICKET}_{member.name}"
        self._pending: dict[int, list[dict | None]] = {}
        self._tickets = itertools.count()
        self._lock = threading.Lock()
        self._lookahead: Lookahead | None = None
        self._sums = torch.zeros(2, len(members), dtype=torch.float64)  # per teacher: positions served, weight
        self._counted = 0.0

    def submit(self, batch: dict[str, Tensor]) -> None:
        """Start every teacher's work for `batch` (a server's requests): under `route`, each on its rows only."""
        if MIXTURE_TICKET in batch:
            return
        parts = self._parts(batch)
        for member, part in zip(self.members, parts):
            if part is not None:
                member.source.submit(part)
        with self._lock:
            ticket = next(self._tickets)
            self._pending[ticket] = parts
        batch[MIXTURE_TICKET] = ticket

    def prefetched(self, batches: Iterator[dict]) -> Iterator[dict]:
        """`batches`, each submitted as it is drawn, as many batches ahead as the most eager server teacher asks."""
        if self._lookahead is None or self._lookahead.source is not batches:
            depth = max((getattr(m.source, "client", None) and m.source.client.settings.prefetch) or 0
                        for m in self.members)
            self._lookahead = Lookahead(batches, depth, self.submit)
        return self._lookahead

    @torch.no_grad()
    def get_signal(self, batch: dict[str, Tensor]) -> TeacherSignal:
        """The mixture's signal (B, T, ...) aligned with the student, and the step's per-teacher statistics."""
        if MIXTURE_TICKET not in batch:
            self.submit(batch)
        with self._lock:
            parts = self._pending.pop(batch[MIXTURE_TICKET])
        answers = [m.source.get_signal(part) if part is not None else None for m, part in zip(self.members, parts)]
        if self.mixture == "route" and all(isinstance(a, DenseSignal) for a in answers if a is not None):
            signal, log_w = _routed_logits(batch, parts, answers)
            self._record(log_w[_counted(batch).to(log_w.device)])
            return signal
        ids = batch["input_ids"]
        counted = _counted(batch)  # the loss reads no other position's teacher
        signals = [None if a is None else log_probs((_placed(a, ids.shape, part["rows"]) if "rows" in part else a)
                                                    .rows(counted)) for a, part in zip(answers, parts)]
        next_ids = torch.zeros_like(ids)
        next_ids[:, :-1] = ids[:, 1:]
        route = batch.get(ROUTE)
        log_w = log_weights(self.mixture, signals, [m.weight for m in self.members], shape=next_ids[counted].shape,
                            route=None if route is None else route[counted], next_ids=next_ids[counted],
                            vocab_size=self.vocab_size, score=self.score, temperature=self.temperature)
        self._record(log_w)
        return _placed(mix(signals, log_w, top_k=self.top_k), counted.shape, counted)

    def _parts(self, batch: dict[str, Tensor]) -> list[dict | None]:
        """What each teacher is asked: the whole batch (weighted, confidence), or under `route` the rows holding a
        token routed to it, with their row numbers (None: no row; a ZeRO-3-sharded teacher still runs one, since
        every rank must join its forward)."""
        if self.mixture != "route":
            return [batch] * len(self.members)
        if ROUTE not in batch:
            raise KeyError(f"the batch has no {ROUTE!r}: xkd.mixture is 'route' but the batch was not built by "
                           "axolotl_xkd's collator from a routed dataset (is another plugin replacing the collator?)")
        route = batch[ROUTE]
        parts: list[dict | None] = []
        for j, member in enumerate(self.members):
            rows = (route == j).any(-1).nonzero().squeeze(-1)
            if rows.numel() == 0 and getattr(member.source, "engine", None) is not None:
                rows = rows.new_zeros(1)
            part = None if rows.numel() == 0 else {k: batch[k][rows] for k in BATCH_KEYS if k in batch}
            if part is not None:
                part["rows"] = rows
            parts.append(part)
        return parts

    def _record(self, log_w: Tensor) -> None:
        """Add the log-weights (m, n) of a batch's counted positions to each teacher's served positions and weights."""
        weights = log_w.exp().double().cpu()
        self._sums[0] += (weights > 0).sum(0)
        self._sums[1] += weights.sum(0)
        self._counted += float(weights.shape[0])

    def metrics(self) -> dict[str, float]:
        """Per teacher since the last call: the share of counted positions it served (a weight above 0) and its mean
        weight there (`teacher/<name>/share`, `teacher/<name>/weight`); then starts a new window."""
        counted = max(self._counted, 1.0)
        logs = {}
        for j, member in enumerate(self.members):
            logs[f"teacher/{member.name}/share"] = float(self._sums[0, j]) / counted
            logs[f"teacher/{member.name}/weight"] = float(self._sums[1, j]) / counted
        self._sums.zero_()
        self._counted = 0.0
        return logs


def _routed_logits(batch: dict[str, Tensor], parts: list[dict | None],
                   answers: list[DenseSignal | None]) -> tuple[DenseSignal, Tensor]:
    """Under `route` with dense teachers only: each position's routed teacher's own logits (the loss normalises them,
    so no log-softmax or mixing pass is needed; exact), and the one-hot log-weights (B, T, n). A row wholly one
    teacher's (unpacked data) is copied as it is; only packed rows of several teachers are merged position by position,
    and rows of no teacher are zero."""
    first = next(a.logits for a in answers if a is not None)
    route = batch[ROUTE].to(first.device)
    logits = first.new_empty((*route.shape, first.shape[-1]))
    dtype = first.dtype
    owner = torch.where((route >= 0).any(-1), route.max(-1).values, -1)  # a row's teacher if it has only one
    whole = (route == owner.unsqueeze(-1)) | (route < 0)
    single = whole.all(-1) & (owner >= 0)
    logits[~single] = 0
    for j, (part, answer) in enumerate(zip(parts, answers)):
        if answer is None:
            continue
        rows, own = part["rows"], single[part["rows"]] & (owner[part["rows"]] == j)
        source = answer.logits if bool(own.all()) else answer.logits[own]  # no copy when every row is its own
        logits.index_copy_(0, rows[own], source.to(dtype))
        shared = ~single[rows]
        if shared.any():
            at = rows[shared]
            chosen = (route[at] == j).unsqueeze(-1)
            logits[at] = torch.where(chosen, answer.logits[shared].to(dtype), logits[at])
    return DenseSignal(logits), route_log_weights(route, len(answers))


def _counted(batch: dict[str, Tensor]) -> Tensor:
    """(B, T) bool: the positions the loss counts (every position of a batch without labels)."""
    if "labels" not in batch:
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)
    return response_mask(batch["labels"], batch.get("position_ids"))


def _placed(signal: TeacherSignal, shape: torch.Size, index: Tensor) -> TeacherSignal:
    """A signal of some positions (m, ...) placed at `index` (rows, or a bool mask of `shape`) of a signal of leading
    shape `shape`: zero logits or empty records elsewhere."""
    if isinstance(signal, DenseSignal):
        logits = signal.logits.new_zeros((*shape, signal.logits.shape[-1]))
        logits[index] = signal.logits
        return DenseSignal(logits)
    ids = signal.token_ids.new_zeros((*shape, signal.token_ids.shape[-1]))
    logprobs = signal.logprobs.new_full((*shape, signal.logprobs.shape[-1]), -math.inf)
    ids[index], logprobs[index] = signal.token_ids, signal.logprobs
    return TopKSignal(ids, logprobs)
