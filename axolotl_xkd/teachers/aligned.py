"""Teachers of another tokenizer (`xkd.teacher.cross_tokenizer: true`): each student sequence is re-tokenized by
the teacher's tokenizer and the teacher's distributions are projected onto the student's positions (cross_tokenizer.py),
in this process (`AlignedTeacherSource`) or by a teacher server (`AlignedServerTeacherSource`, which sends the
teacher's ids as the prompt). The loss receives a top-k signal in student ids, so the loss paths stay as they are.

Imports torch, the alignment module and the two same-tokenizer sources it builds on; knows nothing of Axolotl or the
trainer.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from axolotl_xkd.cross_tokenizer import KEY, AlignedSegment, Aligner, path_rows, project
from axolotl_xkd.frozen_teacher import output_layer_is_linear
from axolotl_xkd.losses.positions import IGNORE_INDEX, response_mask
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.losses.signal import DenseHiddenSignal, TopKSignal
from axolotl_xkd.sequences import segments
from axolotl_xkd.server.client import TeacherServerClient
from axolotl_xkd.teachers.base import TeacherSource
from axolotl_xkd.teachers.model import hidden_signal, load_placed
from axolotl_xkd.teachers.server import Segment, ServerTeacherSource

LOG = logging.getLogger("axolotl_xkd")

REPORT_AT = (1, 10, 100)
"""Batches after which the running coverage is logged."""


class AlignedTeacherSource(TeacherSource):
    """Runs a frozen teacher of another tokenizer on the student's text and returns a TopKSignal in student ids."""

    def __init__(self, model: nn.Module, aligner: Aligner, *, top_k: int, engine: nn.Module | None = None) -> None:
        self.model = model
        self.aligner = aligner
        self.top_k = top_k
        self.engine = engine  # kept alive under ZeRO-3 (see ModelTeacherSource)
        self.dtype = upcast(next(model.parameters()).new_zeros(())).dtype  # the log-probs' dtype
        self.pad_id = aligner.teacher.pad_token_id if aligner.teacher.pad_token_id is not None else 0
        self.coverage = Coverage()
        self.fused = output_layer_is_linear(model)  # form the log-probs from hidden states, a block at a time

    @classmethod
    def load(cls, path: str, *, student_tokenizer, top_k: int, **kwargs) -> AlignedTeacherSource:
        """Load and place the teacher (model.load_placed, without the same-tokenizer rule), read both tokenizers
        and log what maps."""
        model, tokenizer, engine = load_placed(path, student_tokenizer=student_tokenizer, cross_tokenizer=True,
                                               **kwargs)
        aligner = Aligner(student_tokenizer, tokenizer, f"xkd.teacher.path={path!r} with {KEY}")
        LOG.info("X-KD cross-tokenizer teacher: %s", aligner.summary())
        return cls(model, aligner, top_k=top_k, engine=engine)

    @property
    def width(self) -> int:
        """Slots of each position's record: the top k (at most the student's vocabulary) and its own token."""
        return min(self.top_k, self.aligner.vocab.student_size) + 1

    def record_width(self, top_k: int) -> int:
        """The record's own width (`width`): the top k student tokens and the own-token slot."""
        return self.width

    @torch.no_grad()
    def get_signal(self, batch: dict[str, Tensor]) -> TopKSignal:
        """The teacher's top k (+ the student's own token) projected onto every student position that reads a
        teacher position and, where the batch has labels, that the loss counts; empty records elsewhere."""
        ids = batch["input_ids"]
        found = segments(batch)
        rows = ids.tolist()
        responses = responses_of(batch)
        labels = batch["labels"].tolist() if "labels" in batch else None
        aligned = [self.aligner.segment(rows[r][a:b], f"batch row {r} (tokens {a}..{b - 1})",
                                        label_parts(None if labels is None else labels[r][a:b]))
                   for r, a, b in found]
        aligned = counted_only(responses, found, aligned)
        k = self.width
        token_ids = torch.zeros((*ids.shape, k), dtype=torch.long, device=ids.device)
        logprobs = torch.full((*ids.shape, k), -torch.inf, dtype=self.dtype, device=ids.device)
        if aligned:  # also without positions: under ZeRO-3 every rank must run the teacher's forward
            at = Positions.of(ids.cpu(), found, aligned)
            teacher_lp = self._teacher_logprobs([seg.teacher_ids for seg in aligned], at.segment_rows,
                                                at.teacher_rows)
            top_ids, top_lps = project(aligned, None, teacher_lp, at.actions, self.aligner.projection,
                                       top_k=self.top_k)
            token_ids[at.rows, at.cols] = top_ids.to(ids.device)
            logprobs[at.rows, at.cols] = top_lps.to(ids.device)
        self.coverage.report(responses, torch.isfinite(logprobs).any(-1))
        return TopKSignal(token_ids=token_ids, logprobs=logprobs)

    def _teacher_logprobs(self, sequences: list[list[int]], seg_of: Tensor,
                          t_pos: Tensor) -> Tensor | DenseHiddenSignal:
        """The teacher run on its re-tokenized sequences (one right-padded row each): log-probs over its tokenizer's
        vocabulary at the P (sequence, position) pairs, in float32 (float64 for a float64 teacher). With a plain
        Linear output layer, as a `DenseHiddenSignal` at those pairs cut to that vocabulary (`project` forms the
        log-probs a block at a time, `log_probs`); otherwise the (P, V_T) tensor from the model's own logits
        (softcapped or scaled heads)."""
        width = max(map(len, sequences))
        teacher_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for n, sequence in enumerate(sequences):
            teacher_ids[n, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[n, : len(sequence)] = 1
        device = next(self.model.parameters()).device
        inputs = {"input_ids": teacher_ids.to(device), "attention_mask": mask.to(device)}
        seg_of, t_pos = seg_of.to(device), t_pos.to(device)
        size = self.aligner.vocab.teacher_size
        if self.fused:
            signal = hidden_signal(self.model, self.engine, inputs)
            return signal.rows((seg_of, t_pos)).cut(size)
        logits = self.model(**inputs, use_cache=False).logits
        return torch.log_softmax(upcast(logits[seg_of, t_pos, :size]), dim=-1)


class AlignedServerTeacherSource(ServerTeacherSource):
    """A teacher server of another tokenizer: each student sequence is re-tokenized here, the teacher's ids are the
    prompt, and the top-k answer is projected onto the student's positions (`project` over the entries sent)."""

    def __init__(self, client: TeacherServerClient, aligner: Aligner, *, top_k: int) -> None:
        super().__init__(client)
        self.aligner = aligner
        self.record_k = top_k
        eos = aligner.teacher.eos_token_id
        self.end_id = eos if eos is not None else 0
        self.coverage = Coverage()

    @classmethod
    def connect(cls, client: TeacherServerClient, *, student_tokenizer, top_k: int) -> AlignedServerTeacherSource:
        """Read the teacher's tokenizer (xkd.teacher.tokenizer_path), check the server serves it, align it with the
        student's and log what maps."""
        from transformers import AutoTokenizer

        from axolotl_xkd.frozen_teacher import tokenizer_hash

        path = client.settings.tokenizer_path
        teacher_tokenizer = AutoTokenizer.from_pretrained(path)
        client.check_server(teacher_tokenizer, tokenizer_hash(teacher_tokenizer))
        aligner = Aligner(student_tokenizer, teacher_tokenizer, f"xkd.teacher.tokenizer_path={path!r} with {KEY}")
        LOG.info("X-KD cross-tokenizer teacher server: %s", aligner.summary())
        return cls(client, aligner, top_k=top_k)

    @property
    def width(self) -> int:
        """Slots of each position's record: the top k student tokens (at most the k_server + 1 entries of a position
        and the student's vocabulary) and the student's own token."""
        return min(self.record_k, self.client.settings.top_k + 1, self.aligner.vocab.student_size) + 1

    def record_width(self, top_k: int) -> int:
        """The record's own width (`width`): the top k student tokens and the own-token slot."""
        return self.width

    def _prompt(self, sequence: list[int], labels: list[int] | None,
                where: str) -> tuple[list[int], AlignedSegment] | None:
        """The teacher's ids of the sequence's text (each part between label switches re-tokenized on its own,
        `label_parts`) and one token more (its EOS), whose entry is the teacher's distribution after the whole text:
        the one the student's EOS position is aligned with."""
        segment = self.aligner.segment(sequence, where, label_parts(labels))
        if not segment.student_positions:
            return None
        return [*segment.teacher_ids, self.end_id], segment

    def _ask(self, prompts: list[list[int]]) -> Future:
        """Ask also for the log-prob of each prompt's next token (the own-token slot, docs/cross_tokenizer.md)."""
        return self.client.submit(prompts, prompt_token=True)

    def _signal(self, batch: dict[str, Tensor],
                answers: list[tuple[Segment, AlignedSegment, tuple[np.ndarray, np.ndarray]]]) -> TopKSignal:
        """Each student position i that reads teacher position j (and that the loss counts, `counted_only`) gets j's
        entries (the top k and the teacher's next token) projected onto student ids, with its next token u_{i+1} as
        the own token and the entries along its observed path; empty records elsewhere."""
        ids = batch["input_ids"].cpu()
        shape = (*ids.shape, self.width)
        token_ids = torch.zeros(shape, dtype=torch.long)
        logprobs = torch.full(shape, -torch.inf, dtype=torch.float32)
        responses = responses_of(batch)
        found = [found for found, _, _ in answers]
        kept = counted_only(responses, found, [segment for _, segment, _ in answers])
        if kept:
            at = Positions.of(ids, found, kept)
            sent = [answer for _, _, answer in answers]
            sent_ids = torch.cat([torch.from_numpy(a) for a, _ in sent])
            sent_lps = torch.cat([torch.from_numpy(lp) for _, lp in sent])
            offsets = torch.tensor([0, *np.cumsum([len(a) for a, _ in sent])[:-1]], dtype=torch.long)
            flat = offsets[at.segment_rows] + at.teacher_rows  # each row's answer entry, in the answers laid end to end
            token_ids[at.rows, at.cols], logprobs[at.rows, at.cols] = project(
                kept, sent_ids[flat], sent_lps[flat], at.actions, self.aligner.projection, top_k=self.width - 1)
        device = batch["input_ids"].device
        signal = TopKSignal(token_ids=token_ids.to(device), logprobs=logprobs.to(device))
        self.coverage.report(responses, torch.isfinite(signal.logprobs).any(-1))
        return signal


@dataclass(frozen=True)
class Positions:
    """Where the aligned segments' records go and what they read, built once for both teacher kinds: the batch
    row and column of each student position (P,), its own next token (`actions`, -1 at a segment's end), and, for
    the P positions followed by the X observed-path rows (`path_rows`), the segment and teacher position whose
    distribution each reads (`segment_rows`, `teacher_rows`, (P + X,))."""

    rows: Tensor
    cols: Tensor
    actions: Tensor
    segment_rows: Tensor
    teacher_rows: Tensor

    @classmethod
    def of(cls, ids: Tensor, found: list[tuple[int, int, int]], aligned: list[AlignedSegment]) -> Positions:
        pairs = [(n, r, a + i, b, j) for n, ((r, a, b), seg) in enumerate(zip(found, aligned))
                 for i, j in zip(seg.student_positions, seg.teacher_positions)]
        seg_of, rows, cols, stops, t_pos = torch.tensor(pairs, dtype=torch.long).reshape(-1, 5).unbind(-1)
        actions = torch.where(cols + 1 < stops, ids[rows, (cols + 1).clamp(max=ids.shape[1] - 1)], -1)
        path_seg, path_pos = torch.tensor(path_rows(aligned), dtype=torch.long).reshape(-1, 2).unbind(-1)
        return cls(rows, cols, actions, torch.cat([seg_of, path_seg]), torch.cat([t_pos, path_pos]))


def label_parts(labels: list[int] | None) -> list[int]:
    """The token indices where the labels switch between masked and counted: where Axolotl's instruction strategies
    start a separately tokenized part (the response after its prompt), which the teacher re-tokenizes on its own;
    none without labels."""
    masked = [label == IGNORE_INDEX for label in labels or ()]
    return [k for k in range(1, len(masked)) if masked[k] != masked[k - 1]]


def responses_of(batch: dict[str, Tensor]) -> Tensor | None:
    """The batch's response positions (B, T) by the loss's rule; None without labels (every position then)."""
    return None if "labels" not in batch else response_mask(batch["labels"], batch.get("position_ids"))


def counted_only(responses: Tensor | None, found: list[tuple[int, int, int]],
                 aligned: list[AlignedSegment]) -> list[AlignedSegment]:
    """The segments (row, start, end) `found` of the batch with only the student positions the loss counts
    (`responses`; None keeps them all): the loss reads the teacher nowhere else, so the prompt's teacher
    distributions are neither formed nor projected (as chunked.py forms no prompt logits)."""
    if responses is None:
        return aligned
    counted = responses.tolist()
    return [seg.select([counted[r][a + i] for i in seg.student_positions]) for (r, a, _), seg in zip(found, aligned)]


class Coverage:
    """The running share of response positions that got a teacher distribution, logged at REPORT_AT batches."""

    def __init__(self) -> None:
        self.batches = 0
        self.covered = 0
        self.responses = 0

    def report(self, responses: Tensor | None, covered: Tensor) -> None:
        """Count the response positions (B, T; None: a batch without labels, not counted) that are `covered`; log
        the running share at REPORT_AT."""
        if responses is None:
            return
        responses = responses.to(covered.device)
        self.batches += 1
        self.responses += int(responses.sum())
        self.covered += int((responses & covered).sum())
        if self.batches in REPORT_AT:
            LOG.info("X-KD cross-tokenizer coverage after %d batches: %d of %d response positions (%.1f%%) got a "
                     "teacher distribution; the rest had none of the teacher's mass on a student token",
                     self.batches, self.covered, self.responses, 100.0 * self.covered / max(self.responses, 1))
