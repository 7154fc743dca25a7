"""Several teachers as one (`xkd.teachers` with `xkd.mixture`): each named teacher source gives its signal in student
ids (after any cross-tokenizer projection) for the rows it is asked about, and this source hands the loss the
teachers' signals with their weights (`losses.mixed.MixedSignal`, mixed a chunk at a time inside the chunked loss), or
the mixed signal itself where the loss is not chunked.

The mixture is one of probabilities, at temperature 1 like every teacher record: at position i,
p_M(u) = sum_j W_ij p_j(u), with weights W_ij >= 0 summing to 1 over the teachers that have a distribution there
(docs/teachers.md#many-teachers has the math and what each `mixture` makes of W; losses/mixed.py computes it).
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
from axolotl_xkd.losses.mixed import MixedSignal, MixRule, route_log_weights, values_of
from axolotl_xkd.losses.positions import response_mask
from axolotl_xkd.losses.signal import DenseHiddenSignal, DenseSignal, TeacherSignal, TopKSignal
from axolotl_xkd.teachers.base import TeacherSource
from axolotl_xkd.teachers.server import Lookahead

MIXTURE_TICKET = TEACHER_TICKET + "_mixture"
"""Batch key of a batch's pending mixture work (its routed sub-batches)."""
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
"""The batch keys a teacher source reads; a routed teacher gets these rows of them."""


@dataclass(frozen=True)
class Member:
    """One named teacher of a mixture."""

    name: str
    source: TeacherSource
    weight: float = 1.0


class MixtureTeacherSource(TeacherSource):
    """Named teacher sources mixed into one signal: `route` runs each teacher on the rows routed to it only (the
    batch's `keys.ROUTE` column), `weighted` and `confidence` run every teacher on the whole batch."""

    def __init__(self, members: list[Member], *, mixture: str, vocab_size: int, top_k: int,
                 score: str = "logprob", temperature: float = 1.0) -> None:
        self.members, self.mixture = members, mixture
        self.rule = MixRule(mixture, tuple(m.weight for m in members), vocab_size, top_k, score, temperature)
        for member in members:  # several servers tag the same batch: each under its own key
            if hasattr(member.source, "ticket_key"):
                member.source.ticket_key = f"{TEACHER_TICKET}_{member.name}"
        self._pending: dict[int, list[dict | None]] = {}
        self._tickets = itertools.count()
        self._lock = threading.Lock()
        self._lookahead: Lookahead | None = None
        self._sums = torch.zeros(2, len(members), dtype=torch.float64)  # per teacher: positions served, weight
        self._counted = 0.0
        self._unread: list[tuple[Tensor, Tensor]] = []  # a fused loss's weights (seen, counted), read after it ran

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

    @property
    def fusable(self) -> bool:
        """Always: `get_hidden_signal` hands the chunked loss the teachers unmixed (`MixedSignal`), each in-process
        teacher as its hidden states and output layer, so they are mixed a chunk at a time."""
        return True

    @torch.no_grad()
    def get_hidden_signal(self, batch: dict[str, Tensor]) -> MixedSignal:
        """The teachers' signals (B, T, ...) and what weighs them, mixed where the chunked loss reads them; the
        weights it forms are added to the logged statistics at the next call (or log step)."""
        self._read_weights()
        parts, answers = self._answers(batch, hidden=True)
        ids = batch["input_ids"]
        device = next(values_of(a) for a in answers if a is not None).device
        seen = torch.full((ids.numel(), len(self.members)), math.nan, dtype=torch.float64, device=device)
        self._unread.append((seen, _counted(batch).reshape(-1).to(device)))
        members = tuple(None if a is None else _placed(a, ids.shape, part["rows"]) if "rows" in part else a
                        for a, part in zip(answers, parts))
        route = batch.get(ROUTE)
        return MixedSignal(members, self.rule, route=None if route is None else route.to(device),
                           next_ids=_next_ids(ids).to(device), seen=seen,
                           where=torch.arange(ids.numel(), device=device).reshape(ids.shape))

    @torch.no_grad()
    def get_signal(self, batch: dict[str, Tensor]) -> TeacherSignal:
        """The mixture's signal (B, T, ...) aligned with the student, formed at the counted positions only (zero
        logits or empty records elsewhere), and the step's per-teacher statistics."""
        parts, answers = self._answers(batch, hidden=False)
        if self.mixture == "route" and all(isinstance(a, DenseSignal) for a in answers if a is not None):
            signal, log_w = _routed_logits(batch, parts, answers)
            self._record(log_w[_counted(batch).to(log_w.device)].exp())
            return signal
        ids = batch["input_ids"]
        counted = _counted(batch)  # the loss reads no other position's teacher
        members = tuple(None if a is None else (_placed(a, ids.shape, part["rows"]) if "rows" in part else a)
                        .rows(counted) for a, part in zip(answers, parts))
        route = batch.get(ROUTE)
        seen = torch.empty((int(counted.sum()), len(self.members)), dtype=torch.float64)
        mixed = MixedSignal(members, self.rule, route=None if route is None else route[counted],
                            next_ids=_next_ids(ids)[counted], seen=seen, where=torch.arange(seen.shape[0]))
        signal = mixed.formed()
        self._record(seen)
        return _placed(signal, counted.shape, counted)

    def _answers(self, batch: dict[str, Tensor], *, hidden: bool) -> tuple[list[dict | None], list]:
        """What each teacher was asked (`_parts`) and its answer: hidden states and output layer where `hidden` and
        the teacher is fusable, else its signal."""
        if MIXTURE_TICKET not in batch:
            self.submit(batch)
        with self._lock:
            parts = self._pending.pop(batch[MIXTURE_TICKET])
        answers = [None if part is None else
                   m.source.get_hidden_signal(part) if hidden and m.source.fusable else m.source.get_signal(part)
                   for m, part in zip(self.members, parts)]
        return parts, answers

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

    def _record(self, weights: Tensor) -> None:
        """Add the weights (m, n) of a batch's counted positions to each teacher's served positions and weights."""
        weights = weights.double().cpu()
        self._sums[0] += (weights > 0).sum(0)
        self._sums[1] += weights.sum(0)
        self._counted += float(weights.shape[0])

    def _read_weights(self) -> None:
        """Record the weights the fused loss formed at the counted positions of the batches handed out so far."""
        for seen, counted in self._unread:
            weights = seen[counted]
            self._record(weights[~weights.isnan().any(-1)])
        self._unread.clear()

    def metrics(self) -> dict[str, float]:
        """Per teacher since the last call: the share of counted positions it served (a weight above 0) and its mean
        weight there (`teacher/<name>/share`, `teacher/<name>/weight`); then starts a new window."""
        self._read_weights()
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


def _next_ids(ids: Tensor) -> Tensor:
    """(B, T) the observed next token of each position (0 at the last)."""
    next_ids = torch.zeros_like(ids)
    next_ids[:, :-1] = ids[:, 1:]
    return next_ids


def _counted(batch: dict[str, Tensor]) -> Tensor:
    """(B, T) bool: the positions the loss counts (every position of a batch without labels)."""
    if "labels" not in batch:
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)
    return response_mask(batch["labels"], batch.get("position_ids"))


def _placed(signal: TeacherSignal | DenseHiddenSignal, shape: torch.Size, index: Tensor
            ) -> TeacherSignal | DenseHiddenSignal:
    """A signal of some positions (m, ...) placed at `index` (rows, or a bool mask of `shape`) of a signal of leading
    shape `shape`: zero logits or hidden states, or empty records, elsewhere."""
    if isinstance(signal, DenseHiddenSignal):
        hidden = signal.hidden.new_zeros((*shape, signal.hidden.shape[-1]))
        hidden[index] = signal.hidden
        return DenseHiddenSignal(hidden, signal.weight, signal.bias)
    if isinstance(signal, DenseSignal):
        logits = signal.logits.new_zeros((*shape, signal.logits.shape[-1]))
        logits[index] = signal.logits
        return DenseSignal(logits)
    ids = signal.token_ids.new_zeros((*shape, signal.token_ids.shape[-1]))
    logprobs = signal.logprobs.new_full((*shape, signal.logprobs.shape[-1]), -math.inf)
    ids[index], logprobs[index] = signal.token_ids, signal.logprobs
    return TopKSignal(ids, logprobs)
