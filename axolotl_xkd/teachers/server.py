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

import torch
from torch import Tensor

from axolotl_xkd.keys import TEACHER_TICKET
from axolotl_xkd.losses.positions import IGNORE_INDEX, shift_targets
from axolotl_xkd.losses.signal import TopKSignal
from axolotl_xkd.sequences import segments
from axolotl_xkd.server.client import TeacherServerClient
from axolotl_xkd.teachers.base import TeacherSource


def has_response(labels: Tensor) -> bool:
    """Whether a (1, n) sequence has a response position (the loss's rule, `losses.positions.shift_targets`)."""
    return bool((shift_targets(labels, None) != IGNORE_INDEX).any())


class ServerTeacherSource(TeacherSource):
    """Turns batches into teacher top-k signals by asking a teacher server, several batches ahead."""

    def __init__(self, client: TeacherServerClient) -> None:
        self.client = client
        self.top_k = client.settings.top_k
        self._pending: dict[int, list[tuple[Future, list[tuple[int, int, int]]]]] = {}
        self._tickets = itertools.count()
        self._lock = threading.Lock()
        self._lookahead: _Lookahead | None = None

    def submit(self, batch: dict[str, Tensor]) -> None:
        """Send the requests for every sequence of `batch` and tag it with their ticket (once per batch).

        Each sequence (packed segment) is its own prompt; prompts are grouped into requests of at most
        `request_tokens` tokens, so a batch costs a few HTTP round trips rather than one per sequence.
        """
        if TEACHER_TICKET in batch:
            return
        input_ids = batch["input_ids"].cpu().numpy()
        labels = batch.get("labels")
        labels = None if labels is None else labels.cpu()
        budget = self.client.settings.request_tokens
        work: list[tuple[Future, list[tuple[int, int, int]]]] = []
        group: list[tuple[int, int, int]] = []
        for b, start, end in segments(batch):
            # A sequence with no response token needs no teacher (its positions are not trained).
            if end - start < 2 or (labels is not None and not has_response(labels[b : b + 1, start:end])):
                continue
            if group and sum(e - s for _, s, e in group) + end - start > budget:
                work.append((self.client.submit([input_ids[g, s:e].tolist() for g, s, e in group]), group))
                group = []
            group.append((b, start, end))
        if group:
            work.append((self.client.submit([input_ids[g, s:e].tolist() for g, s, e in group]), group))
        with self._lock:
            ticket = next(self._tickets)
            self._pending[ticket] = work
        batch[TEACHER_TICKET] = ticket

    def prefetched(self, batches: Iterator) -> Iterator:
        """`batches`, with each batch's requests sent `prefetch` batches before it is handed out.

        The trainer calls this with the same epoch iterator at every step; the lookahead is kept for it.
        """
        if self._lookahead is None or self._lookahead.source is not batches:
            self._lookahead = _Lookahead(batches, self.client.settings.prefetch, self.submit)
        return self._lookahead

    def get_signal(self, batch: dict[str, Tensor]) -> TopKSignal:
        """TopKSignal (B, T, k) aligned with the student; -inf where a position has no teacher entry."""
        if TEACHER_TICKET not in batch:
            self.submit(batch)  # not drawn through `prefetched` (evaluation): ask now
        with self._lock:
            work = self._pending.pop(batch[TEACHER_TICKET])
        shape = (*batch["input_ids"].shape, self.top_k)
        ids = torch.zeros(shape, dtype=torch.long)
        logprobs = torch.full(shape, -torch.inf, dtype=torch.float32)
        try:
            for future, group in work:
                for (b, start, end), (row_ids, row_logprobs) in zip(group, future.result()):
                    ids[b, start:end] = torch.from_numpy(row_ids)
                    logprobs[b, start:end] = torch.from_numpy(row_logprobs)
        except BaseException:
            self.close()
            raise
        device = batch["input_ids"].device
        return TopKSignal(token_ids=ids.to(device), logprobs=logprobs.to(device))

    def close(self) -> None:
        """Cancel every queued request (after a failure, the run stops)."""
        with self._lock:
            self._pending.clear()
        self.client.close()


class _Lookahead:
    """An iterator that draws `depth` items ahead of the one it hands out, calling `on_draw` on each."""

    def __init__(self, source: Iterator, depth: int, on_draw: Callable[[dict], None]) -> None:
        self.source = source
        self.depth = depth
        self.on_draw = on_draw
        self._queue: deque = deque()
        self._done = False

    def __iter__(self) -> _Lookahead:
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
