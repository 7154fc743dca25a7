"""The byte-span alignment: one student sequence re-tokenized by the teacher, each student position paired with the
teacher position whose prefix ends at or before its own, the bytes between, and the observed path through the
student's next token (docs/cross_tokenizer.md). Where the teacher spells the text otherwise, only the changed spans
are left out.

Imports the token bytes and the projection tables it builds; knows nothing of the trainer, Axolotl or the schema.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from dataclasses import dataclass, fields
from os.path import commonprefix

from axolotl_xkd.cross_tokenizer.projection import Projection
from axolotl_xkd.cross_tokenizer.token_bytes import BYTE_FALLBACK, KEY, VocabMap, joined, token_pieces
from axolotl_xkd.frozen_teacher import special_tokens

LOG = logging.getLogger("axolotl_xkd")

WINDOW, RESYNC = 64, 4
"""Where the teacher spells a text otherwise: the bytes skipped on each side at most, and how many must agree again,
before the alignment resumes (`matching_blocks`)."""
REPORTED = 5
"""Rows whose text the teacher spells otherwise that are logged (the rest are counted in the coverage only)."""


@dataclass(frozen=True)
class AlignedSegment:
    """One student sequence re-tokenized by the teacher, and the student positions that read a teacher position.

    For each such student position i (`student_positions`): the teacher position j it reads (`teacher_positions`),
    the bytes r that the teacher's next token must start with (`partials`, empty where both prefixes end at the same
    byte) and the column of the projection table that holds the student token each continuation starts with
    (`columns`: |r|, one less where the student's next token carries its tokenizer's dummy-prefix space), and how
    many bytes of the text the student has written past the teacher's prefix (`written`, 0 where both end together).

    The observed path (docs/cross_tokenizer.md): `firsts` the teacher's own next token t_{j+1} on the text (its EOS
    after the text's end; -1: none), `path_ends` the last teacher position m whose prefix ends within the student's
    next token u_{i+1} (j where t_{j+1} covers u_{i+1}), and `tails` the bytes q of u_{i+1} past that prefix.
    """

    teacher_ids: list[int]
    student_positions: list[int]
    teacher_positions: list[int]
    partials: list[bytes]
    columns: list[int]
    written: list[int]
    firsts: list[int]
    path_ends: list[int]
    tails: list[bytes]

    @property
    def aligned(self) -> list[int]:
        """The student positions whose prefix ends where a teacher prefix ends."""
        return [i for i, n in zip(self.student_positions, self.written) if not n]

    def select(self, keep: list[bool]) -> AlignedSegment:
        """The segment with only the student positions whose `keep` (one per position) is true."""
        lists = [getattr(self, f.name) for f in fields(self)][1:]
        return AlignedSegment(self.teacher_ids, *([v for v, k in zip(values, keep) if k] for values in lists))

    def path_positions(self) -> list[list[int]]:
        """Per student position, the teacher positions whose distributions its observed path reads past j: j+1..m-1
        (each the teacher's own next token) and m where the tail q is not empty (the tokens that start with q)."""
        return [list(range(j + 1, m + bool(q))) for j, m, q in zip(self.teacher_positions, self.path_ends, self.tails)]


def _prefix_ends(pieces: list[bytes]) -> list[int]:
    """Byte offset where each prefix ends: token i's prefix u_<=i covers bytes [0, ends[i])."""
    ends, total = [], 0
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    return ends


def _strip_dummy_prefix(pieces: list[bytes], starts: list[int]) -> tuple[list[bytes], set[int]]:
    """Drop the leading space a sentencepiece-style tokenizer adds to each text it tokenizes (its decoder strips it
    too) at the first token with bytes of each separately tokenized part (`starts`: the token index each part begins
    at); returns the pieces and the indices of the tokens that lost it."""
    pieces, stripped = list(pieces), set()
    bounds = [*starts, len(pieces)]
    for start, stop in zip(bounds, bounds[1:]):
        first = next((k for k in range(start, stop) if pieces[k]), None)
        if first is not None and pieces[first].startswith(b" "):
            pieces[first] = pieces[first][1:]
            stripped.add(first)
    return pieces, stripped


def _drop_dummy_spaces(pieces: list[bytes], ids: list[int], added: set[int], data: bytes,
                       starts: set[int]) -> tuple[list[bytes], list[bool]]:
    """The teacher's side of the dummy prefix: a sentencepiece-style tokenizer puts a space before each text it
    tokenizes (the parts beginning at token indices `starts`) and (prepend_scheme 'always') again after each added
    token; drop it there, where the student's text has none. Returns the pieces and, per token, whether its space
    was dropped."""
    out, dropped, at, fresh = [], [], 0, True
    for k, (piece, token) in enumerate(zip(pieces, ids)):
        fresh = fresh or k in starts
        drop = fresh and piece.startswith(b" ") and not data.startswith(b" ", at)
        piece = piece[1:] if drop else piece
        fresh = token in added if piece else fresh
        out.append(piece)
        dropped.append(drop)
        at += len(piece)
    return out, dropped


def _utf8_text(data: bytes, where: str) -> bytes:
    """The longest prefix of `data` that is whole UTF-8 (a truncated row may end inside a character)."""
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError as error:
        if error.reason == "unexpected end of data":
            return data[: error.start]
        raise ValueError(
            f"{where}: the student's tokens do not decode to UTF-8 text ({error.reason} at byte {error.start}), so "
            f"the teacher cannot re-tokenize them ({KEY}). Check the row's text and the student's tokenizer."
        ) from error


class Aligner:
    """The student and teacher tokenizers, read once: the token bytes, the vocabulary map, each side's BOS and
    dummy-prefix conventions; `segment` aligns one student sequence with its re-tokenization by the teacher."""

    def __init__(self, student, teacher, where: str) -> None:
        self.teacher = teacher
        self.student_pieces = token_pieces(student, f"{where} (the student's tokenizer)")
        self.teacher_pieces = token_pieces(teacher, f"{where} (the teacher's tokenizer)")
        self.vocab = VocabMap.build(self.student_pieces, self.teacher_pieces,
                                    special_tokens(student), special_tokens(teacher))
        fallback = {i for i, token in enumerate(student.convert_ids_to_tokens(list(range(len(student)))))
                    if token is not None and BYTE_FALLBACK.fullmatch(token)}
        self.projection = Projection(self.student_pieces, self.teacher_pieces, self.vocab, fallback)
        self.student_dummy = self._adds_dummy_prefix(student, self.student_pieces)
        self.teacher_dummy = self._adds_dummy_prefix(teacher, self.teacher_pieces)
        self.teacher_leading = self._leading_specials(teacher)
        self.teacher_added = set(teacher.added_tokens_decoder)
        self.respelled = 0  # rows whose text the teacher spells otherwise (`segment`)

    def summary(self) -> str:
        """What the run logs once: both vocabulary sizes and how many teacher tokens map exactly."""
        vocab = self.vocab
        return (f"student vocabulary {vocab.student_size} tokens, teacher {vocab.teacher_size}; {vocab.exact} teacher "
                f"tokens map exactly to a student token ({100.0 * vocab.exact / max(vocab.teacher_size, 1):.1f}% of "
                "the teacher's)")

    @staticmethod
    def _adds_dummy_prefix(tokenizer, pieces: list[bytes | None]) -> bool:
        """Whether the tokenizer writes 'a' as ' a' (sentencepiece's dummy prefix)."""
        return b"".join(joined(pieces, tokenizer("a", add_special_tokens=False)["input_ids"])) == b" a"

    @staticmethod
    def _leading_specials(tokenizer) -> list[int]:
        """The ids the tokenizer puts before a text (its BOS); trailing ones (an EOS) are left out: the teacher's
        distribution after the text's last token is the one that predicts the student's EOS."""
        full = tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        return next(full[:k] for k in range(len(full) + 1) if full[k: k + len(plain)] == plain)

    def segment(self, student_ids: list[int], where: str, parts: list[int] = ()) -> AlignedSegment:
        """Re-tokenize one student sequence with the teacher and give each student position i (predicting u_{i+1})
        the last teacher position j whose prefix t_<=j ends at or before the byte where u_<=i ends, with the bytes r
        between the two ends, and the observed path through u_{i+1}. Where the teacher's tokens spell the text
        otherwise (a normalizer, a character it cannot spell), the positions whose r or u_{i+1} touch a changed
        byte are left out, and the first few such rows are logged, naming `where`.

        `parts`: the token indices where a separately tokenized part of the sequence begins besides 0 (Axolotl
        tokenizes an instruction row's prompt and response apart; the callers pass where the labels switch between
        masked and counted). Each part's text is re-tokenized by the teacher on its own, as the teacher sees a
        response it generates after its prompt, and each part's dummy-prefix space is not text."""
        pieces = joined(self.student_pieces, student_ids)
        starts = [0, *parts]
        pieces, student_spaces = _strip_dummy_prefix(pieces, starts) if self.student_dummy else (pieces, set())
        data = _utf8_text(b"".join(pieces), where)
        student_ends = _prefix_ends(pieces)
        teacher_ids, teacher_starts = self._retokenized(data, [student_ends[k - 1] for k in starts[1:]])
        teacher_pieces = joined(self.teacher_pieces, teacher_ids)
        teacher_space = [False] * len(teacher_ids)
        if self.teacher_dummy:
            teacher_pieces, teacher_space = _drop_dummy_spaces(teacher_pieces, teacher_ids, self.teacher_added, data,
                                                               teacher_starts)
        spelled = b"".join(teacher_pieces)
        blocks = matching_blocks(data, spelled)
        if spelled != data:
            self._report_respelled(data, spelled, blocks, where)
        teacher_ends = _prefix_ends(teacher_pieces)
        found = []
        for i, end in enumerate(student_ends):
            own = min(len(pieces[i + 1]) if i + 1 < len(pieces) else 0, len(data) - end)  # a cut character: up to it
            block = _block_holding(blocks, end, end + own) if end <= len(data) else None
            if block is None:
                continue
            shift, low = block
            at = end + shift  # the same byte in the teacher's spelling
            j = bisect_right(teacher_ends, at) - 1
            if j < 0 or teacher_ends[j] < low:
                continue
            space = j + 1 < len(teacher_ids) and teacher_space[j + 1]
            partial = b" " * space + spelled[teacher_ends[j]: at]
            column = len(partial) - (i + 1 in student_spaces)  # -1: only the student writes a dummy space here
            first, m, tail = self._observed_path(teacher_ids, teacher_ends, teacher_space, spelled, j, at + own)
            found.append((i, j, partial if column else b"", column, at - teacher_ends[j], first, m, tail))
        columns = list(zip(*found)) or [()] * 8
        return AlignedSegment(teacher_ids, *(list(values) for values in columns))

    def _retokenized(self, data: bytes, bounds: list[int]) -> tuple[list[int], set[int]]:
        """The teacher's ids of the student's text `data`, each part (between the byte offsets `bounds`) tokenized on
        its own after the teacher's leading specials; and the teacher index where each part begins. A bound inside
        a UTF-8 character (or past a cut end) is not a boundary."""
        ids, begins = list(self.teacher_leading), set()
        text_start = 0
        for stop in [*(min(b, len(data)) for b in bounds), len(data)]:
            try:
                text = data[text_start:stop].decode("utf-8")
            except UnicodeDecodeError:
                continue  # the part goes on past a character cut in two
            if text:
                begins.add(len(ids))
                ids += self.teacher(text, add_special_tokens=False)["input_ids"]
            text_start = stop
        return ids, begins

    def _observed_path(self, teacher_ids: list[int], teacher_ends: list[int], teacher_space: list[bool],
                       spelled: bytes, j: int, own_end: int) -> tuple[int, int, bytes]:
        """The teacher's own next token t_{j+1} (its EOS after the text), the last teacher position m whose prefix
        ends within the student's next token (which ends at byte `own_end`; m = j where t_{j+1} covers it) and
        the bytes q of that token past t_<=m."""
        if j + 1 >= len(teacher_ids):
            eos = self.teacher.eos_token_id
            return (-1 if eos is None else eos), j, b""
        if teacher_ends[j + 1] >= own_end:
            return teacher_ids[j + 1], j, b""
        m = bisect_right(teacher_ends, own_end) - 1
        space = m + 1 < len(teacher_ids) and teacher_space[m + 1] and teacher_ends[m] < own_end
        return teacher_ids[j + 1], m, b" " * space + spelled[teacher_ends[m]: own_end]

    def _report_respelled(self, data: bytes, spelled: bytes, blocks: list[tuple[int, int, int]], where: str) -> None:
        """Log the first REPORTED rows whose text the teacher spells otherwise, with the bytes around the first
        difference; their changed spans get no teacher distribution (counted in the coverage)."""
        self.respelled += 1
        if self.respelled > REPORTED:
            return
        at = blocks[0][2] if blocks and blocks[0][0] == 0 else 0
        LOG.warning(
            "%s: the teacher's tokenizer spells the text otherwise (%s): the student's tokens spell %r around byte "
            "%d, the teacher's re-tokenization %r (a normalizer, or characters it cannot spell). The positions "
            "there get no teacher distribution (counted in the coverage); the rest of the row is aligned.%s",
            where, KEY, data[max(0, at - 20): at + 20], at, spelled[max(0, at - 20): at + 20],
            " Further such rows are not logged." if self.respelled == REPORTED else "")


def matching_blocks(data: bytes, spelled: bytes) -> list[tuple[int, int, int]]:
    """The spans (a, b, n) where data[a:a+n] == spelled[b:b+n], in order, found by walking both texts and, after a
    difference, resuming at the nearest bytes where RESYNC bytes agree again (skipping at most WINDOW on each side;
    beyond that the rest is left unmatched). One span for equal texts."""
    if data == spelled:  # the common case, compared in C: no walk
        return [(0, 0, len(data))] if data else []
    blocks: list[tuple[int, int, int]] = []
    a = b = 0
    while a < len(data) and b < len(spelled):
        n = len(commonprefix([data[a:], spelled[b:]]))
        if n:
            blocks.append((a, b, n))
            a, b = a + n, b + n
            continue
        resumed = _resume(data, spelled, a, b)
        if resumed is None:
            break
        a, b = resumed
    return blocks


def _resume(data: bytes, spelled: bytes, a: int, b: int) -> tuple[int, int] | None:
    """The nearest (a + x, b + y), x + y smallest, where the next RESYNC bytes of both agree (or both texts end)."""
    for total in range(1, 2 * WINDOW + 1):
        for x in range(max(0, total - WINDOW), min(total, WINDOW) + 1):
            at_a, at_b = a + x, b + total - x
            if at_a > len(data) or at_b > len(spelled):
                continue
            head_a, head_b = data[at_a: at_a + RESYNC], spelled[at_b: at_b + RESYNC]
            if head_a == head_b and (len(head_a) == RESYNC or (at_a + len(head_a), at_b + len(head_b)) ==
                                     (len(data), len(spelled))):
                return at_a, at_b
    return None


def _block_holding(blocks: list[tuple[int, int, int]], start: int, stop: int) -> tuple[int, int] | None:
    """For the matching block that holds data[start:stop] (its ends included): the shift from data's offsets to the
    spelling's, and where the block starts in the spelling. None where those bytes touch a difference."""
    k = bisect_right(blocks, (start, math.inf, math.inf)) - 1
    if k < 0:
        return None
    a, b, n = blocks[k]
    if stop > a + n:
        return None
    return b - a, b
