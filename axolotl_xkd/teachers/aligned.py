"""The in-process teacher of another tokenizer (`xkd.teacher.cross_tokenizer: true`): each student sequence is
re-tokenized by the teacher, run through it, and its distributions aligned to the student's positions
(cross_tokenizer.py); the loss receives a top-k signal in student ids, so the loss paths stay as they are.

Imports torch and the alignment module; knows nothing of Axolotl or the trainer.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from axolotl_xkd.cross_tokenizer import KEY, Aligner, express
from axolotl_xkd.losses.positions import IGNORE_INDEX, shift_targets
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.losses.signal import TopKSignal
from axolotl_xkd.sequences import segments
from axolotl_xkd.teachers.base import TeacherSource
from axolotl_xkd.teachers.model import load_placed

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
        self.inverse = aligner.vocab.teacher_ids()
        self.dtype = upcast(next(model.parameters()).new_zeros(())).dtype  # the log-probs' dtype
        self.pad_id = aligner.teacher.pad_token_id if aligner.teacher.pad_token_id is not None else 0
        self.batches = 0
        self.covered = 0
        self.responses = 0

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
        """Slots of each position's record: the top k (at most the mapped tokens) and the student's own token."""
        return min(self.top_k, self.aligner.vocab.exact) + 1

    @torch.no_grad()
    def get_signal(self, batch: dict[str, Tensor]) -> TopKSignal:
        """Teacher top-k (+ the student's own token) at every aligned student position; empty records elsewhere."""
        ids = batch["input_ids"]
        found = segments(batch)
        rows = ids.tolist()
        aligned = [self.aligner.segment(rows[r][a:b], f"batch row {r} (tokens {a}..{b - 1})") for r, a, b in found]
        k = self.width
        token_ids = torch.zeros((*ids.shape, k), dtype=torch.long, device=ids.device)
        logprobs = torch.full((*ids.shape, k), -torch.inf, dtype=self.dtype, device=ids.device)
        pairs = [(n, r, a + i, b, j) for n, ((r, a, b), seg) in enumerate(zip(found, aligned))
                 for i, j in zip(seg.student_positions, seg.teacher_positions)]
        if aligned:  # also without pairs: under ZeRO-3 every rank must run the teacher's forward
            seg_of, rows_b, cols, stops, t_pos = torch.tensor(pairs, dtype=torch.long).reshape(-1, 5).unbind(-1)
            actions = torch.where(cols + 1 < stops, ids.cpu()[rows_b, (cols + 1).clamp(max=ids.shape[1] - 1)], -1)
            teacher_lp = self._teacher_logprobs([seg.teacher_ids for seg in aligned], seg_of, t_pos)
            top_ids, top_lps = express(teacher_lp, actions.to(teacher_lp.device), self.aligner.vocab,
                                       self.inverse, top_k=self.top_k)
            token_ids[rows_b, cols] = top_ids.to(ids.device)
            logprobs[rows_b, cols] = top_lps.to(ids.device)
        self._report(batch, torch.isfinite(logprobs).any(-1))
        return TopKSignal(token_ids=token_ids, logprobs=logprobs)

    def _teacher_logprobs(self, sequences: list[list[int]], seg_of: Tensor, t_pos: Tensor) -> Tensor:
        """The teacher run on its re-tokenized sequences (one right-padded row each): log-probs over its tokenizer's
        vocabulary, (P, V_T) in float32 (float64 for a float64 teacher), at the P (sequence, position) pairs."""
        width = max(map(len, sequences))
        teacher_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for n, sequence in enumerate(sequences):
            teacher_ids[n, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[n, : len(sequence)] = 1
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=teacher_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        picked = logits[seg_of.to(device), t_pos.to(device), : self.aligner.vocab.teacher_size]
        return torch.log_softmax(upcast(picked), dim=-1)

    def _report(self, batch: dict[str, Tensor], covered: Tensor) -> None:
        """Count the response positions that got a teacher distribution; log the running share at REPORT_AT."""
        if "labels" not in batch:
            return
        responses = shift_targets(batch["labels"], batch.get("position_ids")) != IGNORE_INDEX
        self.batches += 1
        self.responses += int(responses.sum())
        self.covered += int((responses & covered).sum())
        if self.batches in REPORT_AT:
            LOG.info("X-KD cross-tokenizer coverage after %d batches: %d of %d response positions (%.1f%%) got a "
                     "teacher distribution; the rest are inside spans the two tokenizers cut differently",
                     self.batches, self.covered, self.responses, 100.0 * self.covered / max(self.responses, 1))
