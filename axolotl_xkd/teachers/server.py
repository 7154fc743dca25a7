"""The server teacher (`xkd.teacher.source: server`): top-k log-probs from a teacher server, as a teacher source.

A thin adapter over `axolotl_xkd.server.client`: each sequence of a batch (each packed segment, never one prompt
across segments) becomes a prompt; prompts are grouped into requests of up to `request_tokens` tokens. Requests
go out as soon as a batch is drawn (`prefetched`), several batches ahead of its step; `get_signal` waits for the
answers. A failed request stops the run (TeacherServerError): a batch is never trained with a missing teacher
target. Imports torch and the server client; nothing of transformers, Axolotl or the trainer.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import torch
from torch import Tensor

from axolotl_xkd.keys import TEACHER_TICKET
from axolotl_xkd.losses.positions import response_mask
from axolotl_xkd.losses.signal import TopKSignal
from axolotl_xkd.sequences import segments
from axolotl_xkd.server.client import TeacherServerClient
from axolotl_xkd.teachers.base import TeacherSource


def has_response(labels: Tensor) -> bool:
    """Whether a (1, n) sequence has a response position (the loss's rule, `losses.positions.response_mask`)."""
    return bool(response_mask(labels, None).any())


Segment = tuple[int, int, int]
"""(row, start, end) of one sequence of a batch (sequences.segments)."""


class ServerTeacherSource(TeacherSource):
    """Turns batches into teacher top-k signals by asking a teacher server, several batches ahead.

    A teacher of another tokenizer (teachers/aligned.py) changes three steps: what a sequence's prompt is
    (`_prompt`), how it is asked (`_ask`) and how the answers become the signal (`_signal`).
    """

    def __init__(self, client: TeacherServerClient) -> None:
        self.client = client
        self.top_k = client.settings.top_k
        self._pending: dict[int, list[tuple[Future, list[tuple[Segment, object]]]]] = {}
        self._tickets = itertools.count()
        self._lock = threading.Lock()
        self._lookahead: Lookahead | None = None
        # The batch key of this source's ticket; several servers of a mixture tag the same batch, each its own.
        self.ticket_key = TEACHER_TICKET

    def submit(self, batch: dict[str, Tensor]) -> None:
        """Send the requests for every sequence of `batch` and tag it with their ticket (once per batch).

        Each sequence (packed segment) is its own prompt; prompts are grouped into requests of at most
        `request_tokens` tokens, so a batch costs a few HTTP round trips rather than one per sequence.
        """
        if self.ticket_key in batch:
            return
        input_ids = batch["input_ids"].cpu().numpy()
        labels = batch.get("labels")
        labels = None if labels is None else labels.cpu()
        budget = self.client.settings.request_tokens
        work: list[tuple[Future, list[tuple[Segment, object]]]] = []
        group: list[tuple[Segment, list[int], object]] = []
        for b, start, end in segments(batch):
            # A sequence with no response token needs no teacher (its positions are not trained).
            if end - start < 2 or (labels is not None and not has_response(labels[b : b + 1, start:end])):
                continue
            asked = self._prompt(input_ids[b, start:end].tolist(),
                                 None if labels is None else labels[b, start:end].tolist(),
                                 f"batch row {b} (tokens {start}..{end - 1})")
            if asked is None:
                continue
            if group and sum(len(p) for _, p, _ in group) + len(asked[0]) > budget:
                work.append((self._ask([p for _, p, _ in group]), [(seg, plan) for seg, _, plan in group]))
                group = []
            group.append(((b, start, end), *asked))
        if group:
            work.append((self._ask([p for _, p, _ in group]), [(seg, plan) for seg, _, plan in group]))
        with self._lock:
            ticket = next(self._tickets)
            self._pending[ticket] = work
        batch[self.ticket_key] = ticket

    def _prompt(self, sequence: list[int], labels: list[int] | None, where: str) -> tuple[list[int], object] | None:
        """The prompt that asks for a sequence's teacher entries (its `labels` where the batch has them), and what
        `_signal` needs to place them (None: nothing to ask). Here the sequence itself: the student's tokens are the
        teacher's."""
        return sequence, None

    def _ask(self, prompts: list[list[int]]) -> Future:
        """One request for `prompts`, in the client's thread pool."""
        return self.client.submit(prompts)

    def prefetched(self, batches: Iterator) -> Iterator:
        """`batches`, with each batch's requests sent `prefetch` batches before it is handed out.

        The trainer calls this with the same epoch iterator at every step; the lookahead is kept for it.
        """
        if self._lookahead is None or self._lookahead.source is not batches:
            self._lookahead = Lookahead(batches, self.client.settings.prefetch, self.submit)
        return self._lookahead

    def record_width(self, top_k: int) -> int:
        """The server's entries per position (xkd.teacher.top_k): its records are stored as they come."""
        return self.top_k

    def get_signal(self, batch: dict[str, Tensor]) -> TopKSignal:
        """TopKSignal (B, T, k) aligned with the student; -inf where a position has no teacher entry."""
        if self.ticket_key not in batch:
            self.submit(batch)  # not drawn through `prefetched` (evaluation): ask now
        with self._lock:
            work = self._pending.pop(batch[self.ticket_key])
        try:
            answers = [(segment, plan, answer) for future, group in work
                       for (segment, plan), answer in zip(group, future.result())]
        except BaseException:
            self.close()
            raise
        return self._signal(batch, answers)

    def _signal(self, batch: dict[str, Tensor],
                answers: list[tuple[Segment, object, tuple[np.ndarray, np.ndarray]]]) -> TopKSignal:
        """The answers (each sequence's (n, k) ids and log-probs) placed at their sequences' positions."""
        shape = (*batch["input_ids"].shape, self.top_k)
        ids = torch.zeros(shape, dtype=torch.long)
        logprobs = torch.full(shape, -torch.inf, dtype=torch.float32)
        for (b, start, end), _, (row_ids, row_logprobs) in answers:
            ids[b, start:end] = torch.from_numpy(row_ids)
            logprobs[b, start:end] = torch.from_numpy(row_logprobs)
        device = batch["input_ids"].device
        return TopKSignal(token_ids=ids.to(device), logprobs=logprobs.to(device))

    def close(self) -> None:
        """Cancel every queued request (after a failure, the run stops)."""
        with self._lock:
            self._pending.clear()
        self.client.close()


class Lookahead:
    """An iterator that draws `depth` items ahead of the one it hands out, calling `on_draw` on each."""

    def __init__(self, source: Iterator, depth: int, on_draw: Callable[[dict], None]) -> None:
        self.source = source
        self.depth = depth
        self.on_draw = on_draw
        self._queue: deque = deque()
        self._done = False

    def __iter__(self) -> Lookahead:
        return self

    def __next__(self):
        while not self._done and len(self._queue) <= self.depth:
            try:
                item = next(self.source)
            except StopIteration:
                self._done = True
                break
            self.on_draw(item)
            self._queue.append(item)
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()
