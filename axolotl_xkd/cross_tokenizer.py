"""Distillation across tokenizers: the one home of the vocabulary map, the byte-span alignment and the prefix
projection that turn a teacher's next-token distributions over its own tokens into a top-k signal at the student's
positions.

The student's text of a sequence is the concatenation of its tokens' bytes; the teacher re-tokenizes that text.
Student position i, whose prefix u_<=i ends at byte b, reads the teacher's distribution at the last teacher position
j whose prefix ends at or before b. The teacher's next token t_{j+1} then starts with the bytes r between the two
ends (empty where both prefixes end at b). Every teacher token t that starts with r gives its probability to the
student token that the rest of its bytes start with (the longest such student token, or its exact twin where r is
empty), normalised over the tokens that start with r. docs/cross_tokenizer.md has the math and the rules for
special tokens, BOS and leading spaces.

Imports torch and the loss's signal type; reads tokenizers through their own (fast) backend. Knows nothing of the
trainer, Axolotl or the config schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import logging
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field, fields
from functools import cache
from os.path import commonprefix

import torch
from torch import Tensor

from axolotl_xkd.frozen_teacher import SPECIAL_TOKENS, special_tokens
from axolotl_xkd.losses.categories import TAIL_FLOOR
from axolotl_xkd.losses.precision import upcast

LOG = logging.getLogger("axolotl_xkd")

KEY = "xkd.teacher.cross_tokenizer"
"""The config key that allows a teacher of another tokenizer; errors name it."""

RULE = "prefix-projection, observed path"
"""How records are made (docs/cross_tokenizer.md), part of the digest a cross-tokenizer store's manifest keeps."""

WINDOW, RESYNC = 64, 4
"""Where the teacher spells a text otherwise: the bytes skipped on each side at most, and how many must agree again,
before the alignment resumes (`matching_blocks`)."""
REPORTED = 5
"""Rows whose text the teacher spells otherwise that are logged (the rest are counted in the coverage only)."""


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_PER_TEXT_STEPS = {"Fuse", "Strip"}  # act on the decoded text as a whole: the dummy prefix rule covers Strip
_SUPPORTED_STEPS = {"ByteLevel", "Metaspace", "Replace", "ByteFallback"} | _PER_TEXT_STEPS


@cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte (`Ġ` is b' ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _decoder_steps(tokenizer, where: str) -> list[dict]:
    """The steps of the tokenizer's own decoder (tokenizer.json), flattened; an error for what we cannot read."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{where}: {type(tokenizer).__name__} is a slow tokenizer; {KEY} reads each token's bytes from a fast "
            "tokenizer's decoder (tokenizer.json). Save the tokenizer with a tokenizer.json (AutoTokenizer with "
            f"use_fast=True) or set {KEY}: false with a teacher of the student's tokenizer."
        )
    decoder = json.loads(backend.to_str()).get("decoder") or {"type": "Fuse"}
    steps = decoder["decoders"] if decoder["type"] == "Sequence" else [decoder]
    unknown = sorted({s["type"] for s in steps} - _SUPPORTED_STEPS)
    unknown += ["Replace with a regex"] * any(s["type"] == "Replace" and "String" not in s["pattern"] for s in steps)
    if unknown:
        raise ValueError(
            f"{where}: the tokenizer's decoder uses {unknown}; {KEY} supports byte-level BPE, sentencepiece "
            f"(Metaspace / Replace + ByteFallback) and plain (Fuse) decoders. Use such a tokenizer for this teacher."
        )
    return steps


def check_readable(tokenizer, where: str) -> None:
    """Raise, naming `where`, unless each token's bytes can be read from the tokenizer's decoder (a fast tokenizer
    whose decoder steps `token_pieces` knows): the early check before a cross-tokenizer run prepares its data."""
    _decoder_steps(tokenizer, where)


def _piece(token: str, steps: list[dict]) -> bytes:
    """The bytes one token string stands for, decoded the way the tokenizer's own decoder does it."""
    if any(step["type"] == "ByteLevel" for step in steps):
        table = _unicode_to_byte()
        return bytes(table[c] for c in token) if all(c in table for c in token) else token.encode()
    for step in steps:
        if step["type"] == "ByteFallback" and (match := _BYTE_FALLBACK.fullmatch(token)):
            return bytes([int(match[1], 16)])
        if step["type"] == "Replace":
            token = token.replace(step["pattern"]["String"], step["content"])
        elif step["type"] == "Metaspace":
            token = token.replace(step["replacement"], " ")
    return token.encode()


def token_pieces(tokenizer, where: str) -> list[bytes | None]:
    """By id: the bytes the token adds to the text; None for BOS, EOS, PAD and UNK, which add none (zero width).

    Special added tokens (chat markers and the like) stand for their own content, as the chat template renders them;
    other added tokens (Gemma's `▁▁`, a run of two spaces) are decoded like any token, as the tokenizer's decoder does.
    """
    steps = _decoder_steps(tokenizer, where)
    zero_width = {i for i in special_tokens(tokenizer).values() if i is not None}
    marker = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [None if i in zero_width or token is None else marker[i].encode() if i in marker else _piece(token, steps)
            for i, token in enumerate(tokens)]


def _joined(pieces: list[bytes | None], ids: list[int]) -> list[bytes]:
    return [pieces[i] or b"" for i in ids]


@dataclass(frozen=True)
class VocabMap:
    """teacher id -> student id of the token with the same bytes (-1: none), one teacher id per student id."""

    student_ids: Tensor
    student_size: int

    @classmethod
    def build(cls, student_pieces: list[bytes | None], teacher_pieces: list[bytes | None],
              student_roles: dict[str, int | None], teacher_roles: dict[str, int | None]) -> VocabMap:
        """Equal byte strings map; BOS, EOS, PAD and UNK map by role (the teacher's EOS is the student's EOS,
        whatever their strings); where several tokens of a side spell the same bytes (a character and its byte-fallback
        token) they pair in id order, so identical tokenizers map every id to itself."""
        lookup: dict[bytes, list[int]] = {}
        for sid, piece in enumerate(student_pieces):
            if piece:
                lookup.setdefault(piece, []).append(sid)
        mapping = [-1] * len(teacher_pieces)
        claimed: set[int] = set()
        for role in SPECIAL_TOKENS:  # in this order: a teacher PAD that is also its EOS stays the student's EOS
            sid, tid = student_roles.get(role), teacher_roles.get(role)
            if sid is not None and tid is not None and mapping[tid] == -1 and sid not in claimed:
                mapping[tid] = sid
                claimed.add(sid)
        for tid, piece in enumerate(teacher_pieces):
            free = [sid for sid in lookup.get(piece, ()) if sid not in claimed] if piece else []
            if mapping[tid] == -1 and free:
                mapping[tid] = free[0]
                claimed.add(free[0])
        return cls(torch.tensor(mapping, dtype=torch.long), len(student_pieces))

    @property
    def teacher_size(self) -> int:
        return self.student_ids.numel()

    @property
    def exact(self) -> int:
        """How many teacher tokens have a student twin."""
        return int((self.student_ids >= 0).sum())

    def digest(self) -> str:
        """sha256 of the map and the projection rule (RULE): a store built for another pair of tokenizers, or by an
        earlier rule, has another digest."""
        payload = json.dumps({"student_size": self.student_size, "map": self.student_ids.tolist(), "rule": RULE})
        return hashlib.sha256(payload.encode()).hexdigest()


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
    firsts: list[int] = field(default_factory=list)
    path_ends: list[int] = field(default_factory=list)
    tails: list[bytes] = field(default_factory=list)

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
        if not self.firsts:
            return [[] for _ in self.student_positions]
        return [list(range(j + 1, m + bool(q))) for j, m, q in zip(self.teacher_positions, self.path_ends, self.tails)]


def _prefix_ends(pieces: list[bytes]) -> list[int]:
    """Byte offset where each prefix ends: token i's prefix u_<=i covers bytes [0, ends[i])."""
    ends, total = [], 0
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    return ends


def _strip_dummy_prefix(pieces: list[bytes]) -> tuple[list[bytes], int]:
    """Drop the leading space a sentencepiece-style tokenizer adds to a text (its decoder strips it too); returns the
    pieces and the index of the token that lost it (-1: none)."""
    first = next((k for k, p in enumerate(pieces) if p), None)
    if first is None or not pieces[first].startswith(b" "):
        return pieces, -1
    return [*pieces[:first], pieces[first][1:], *pieces[first + 1:]], first


def _drop_dummy_spaces(pieces: list[bytes], ids: list[int], added: set[int],
                       data: bytes) -> tuple[list[bytes], list[bool]]:
    """The teacher's side of the dummy prefix: a sentencepiece-style tokenizer puts a space before the text and
    (prepend_scheme 'always') again after each added token; drop it there, where the student's text has none.
    Returns the pieces and, per token, whether its space was dropped."""
    out, dropped, at, fresh = [], [], 0, True
    for piece, token in zip(pieces, ids):
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


@dataclass(frozen=True)
class ProjectionTables:
    """The projection's index tables, on one device. By teacher id: `rank` (position in byte order), `widths`
    (max(|beta(t)|, 1)), `starts` (where t's columns begin in `table`), `aligned` (column 0: the student token where r
    is empty, -1: none); `table` the flat columns; `order` teacher ids by rank; `sources`, `targets` the teacher ids
    with a column-0 student token and that token; `twins` student id -> teacher id where the map is one-to-one."""

    rank: Tensor
    widths: Tensor
    starts: Tensor
    table: Tensor
    order: Tensor
    aligned: Tensor
    sources: Tensor
    targets: Tensor
    twins: Tensor


class Projection:
    """The teacher's vocabulary read for the prefix projection: its tokens sorted by their bytes (the tokens that start
    with r are one run of that order) and, for each teacher token t and byte offset o < |beta(t)|, the student token
    that beta(t)[o:] starts with: the longest student token that is a prefix of it (among student tokens of the same
    bytes, one that is not a byte-fallback token `<0xHH>`, then the lowest id). Column 0 is the vocabulary map where t
    has a twin (special tokens by role)."""

    def __init__(self, student_pieces: list[bytes | None], teacher_pieces: list[bytes | None], vocab: VocabMap,
                 fallback: set[int]) -> None:
        self.student_size = vocab.student_size
        teacher = [piece or b"" for piece in teacher_pieces]
        trie: dict = {}
        for sid in sorted((sid for sid, piece in enumerate(student_pieces) if piece), key=lambda s: (s in fallback, s)):
            node = trie
            for byte in student_pieces[sid]:
                node = node.setdefault(byte, {})
            node.setdefault(-1, sid)
        twins = vocab.student_ids.tolist()
        widths = [max(len(piece), 1) for piece in teacher]
        table: list[int] = []
        for tid, piece in enumerate(teacher):
            table.append(twins[tid] if twins[tid] >= 0 else _longest(trie, piece, 0))
            table.extend(_longest(trie, piece, o) for o in range(1, len(piece)))
        order = sorted(range(len(teacher)), key=teacher.__getitem__)
        self.sorted_pieces = [teacher[t] for t in order]
        rank = [0] * len(teacher)
        for position, tid in enumerate(order):
            rank[tid] = position
        widths_t = torch.tensor(widths, dtype=torch.long)
        starts = torch.cumsum(widths_t, 0) - widths_t
        table_t = torch.tensor(table, dtype=torch.long)
        aligned = table_t[starts]
        sources = (aligned >= 0).nonzero().squeeze(-1)
        targets = aligned[sources]
        self.one_to_one = targets.unique().numel() == targets.numel()  # no two teacher tokens share a student token
        twins = torch.full((self.student_size,), -1, dtype=torch.long)
        if self.one_to_one:
            twins[targets] = sources
        self._tables = {torch.device("cpu"): ProjectionTables(
            rank=torch.tensor(rank, dtype=torch.long), widths=widths_t, starts=starts, table=table_t,
            order=torch.tensor(order, dtype=torch.long), aligned=aligned, sources=sources, targets=targets,
            twins=twins)}

    def tables(self, device: torch.device) -> ProjectionTables:
        """The index tables on `device`, copied there once."""
        if device not in self._tables:
            cpu = self._tables[torch.device("cpu")]
            self._tables[device] = ProjectionTables(**{f.name: getattr(cpu, f.name).to(device) for f in fields(cpu)})
        return self._tables[device]

    def run(self, partial: bytes) -> tuple[int, int]:
        """The ranks [lo, hi) of the teacher tokens whose bytes start with `partial`."""
        lo = bisect_left(self.sorted_pieces, partial)
        stop = partial.rstrip(b"\xff")
        if not stop:
            return lo, len(self.sorted_pieces)
        return lo, bisect_left(self.sorted_pieces, stop[:-1] + bytes([stop[-1] + 1]), lo)


def _longest(trie: dict, piece: bytes, offset: int) -> int:
    """The student id of the longest student token that piece[offset:] starts with (-1: none)."""
    found, node = -1, trie
    for byte in piece[offset:]:
        node = node.get(byte)
        if node is None:
            break
        found = node.get(-1, found)
    return found


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
                    if token is not None and _BYTE_FALLBACK.fullmatch(token)}
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
        return b"".join(_joined(pieces, tokenizer("a", add_special_tokens=False)["input_ids"])) == b" a"

    @staticmethod
    def _leading_specials(tokenizer) -> list[int]:
        """The ids the tokenizer puts before a text (its BOS); trailing ones (an EOS) are left out: the teacher's
        distribution after the text's last token is the one that predicts the student's EOS."""
        full = tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        return next(full[:k] for k in range(len(full) + 1) if full[k: k + len(plain)] == plain)

    def segment(self, student_ids: list[int], where: str) -> AlignedSegment:
        """Re-tokenize one student sequence with the teacher and give each student position i (predicting u_{i+1})
        the last teacher position j whose prefix t_<=j ends at or before the byte where u_<=i ends, with the bytes r
        between the two ends, and the observed path through u_{i+1}. Where the teacher's tokens spell the text
        otherwise (a normalizer, a character it cannot spell), the positions whose r or u_{i+1} touch a changed
        byte are left out, and the first few such rows are logged, naming `where`."""
        pieces = _joined(self.student_pieces, student_ids)
        pieces, student_space = _strip_dummy_prefix(pieces) if self.student_dummy else (pieces, -1)
        data = _utf8_text(b"".join(pieces), where)
        teacher_ids = self.teacher_leading + self.teacher(data.decode("utf-8"), add_special_tokens=False)["input_ids"]
        teacher_pieces = _joined(self.teacher_pieces, teacher_ids)
        teacher_space = [False] * len(teacher_ids)
        if self.teacher_dummy:
            teacher_pieces, teacher_space = _drop_dummy_spaces(teacher_pieces, teacher_ids, self.teacher_added, data)
        spelled = b"".join(teacher_pieces)
        blocks = matching_blocks(data, spelled)
        if len(blocks) != 1 or blocks[0][2] != len(data) or len(spelled) != len(data):
            self._report_respelled(data, spelled, blocks, where)
        teacher_ends = _prefix_ends(teacher_pieces)
        found = []
        for i, end in enumerate(_prefix_ends(pieces)):
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
            column = len(partial) - (i + 1 == student_space)
            if column < 0:  # only the student writes a dummy space here: no teacher token spells it
                continue
            first, m, tail = self._observed_path(teacher_ids, teacher_ends, teacher_space, spelled, j, at + own)
            found.append((i, j, partial if column else b"", column, at - teacher_ends[j], first, m, tail))
        columns = list(zip(*found)) or [()] * 8
        return AlignedSegment(teacher_ids, *(list(values) for values in columns))

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


@dataclass(frozen=True)
class HiddenRows:
    """The teacher's log-probs over its `size` tokens at P positions, given as its last hidden states there (P, H)
    and its output layer (V, H): indexed like the (P, V_T) tensor, each block of rows is formed when it is read (as
    the fused loss forms the teacher's logits), so no (P, V_T) logits or log-probs exist at once."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    size: int

    def __getitem__(self, rows: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias[: self.size]
        logits = torch.nn.functional.linear(self.hidden[rows], self.weight[: self.size], bias)
        return torch.log_softmax(upcast(logits), dim=-1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.hidden.shape[0], self.size

    @property
    def dtype(self) -> torch.dtype:
        return upcast(self.hidden.new_zeros(())).dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device


def path_rows(segments: list[AlignedSegment]) -> list[tuple[int, int]]:
    """(segment index, teacher position) of every observed-path factor, in the order `project` reads them after
    the rows of the student positions."""
    return [(n, l) for n, segment in enumerate(segments) for path in segment.path_positions() for l in path]


@dataclass(frozen=True)
class _Plan:
    """What `project` reads of the segments, as tensors over the P student positions: the run of teacher tokens
    that start with r (ranks [lows, highs)), the table column, whether r is not empty (`inside`), the teacher's own
    next token (`firsts`) and whether u_{i+1} reaches past it (`beyond`); over the X path factors: the position each
    belongs to (`owners`), the teacher token whose log-prob it reads (`tokens`, -1 for a tail) or the run of the
    tokens that start with the tail q (`tail_lows`, `tail_highs`)."""

    lows: Tensor
    highs: Tensor
    columns: Tensor
    inside: Tensor
    firsts: Tensor
    beyond: Tensor
    owners: Tensor
    tokens: Tensor
    tail_lows: Tensor
    tail_highs: Tensor

    @classmethod
    def of(cls, segments: list[AlignedSegment], projection: Projection, device: torch.device) -> _Plan:
        partials = [r for segment in segments for r in segment.partials]
        position = [(segment, j, m, q) for segment in segments
                    for j, m, q in zip(segment.teacher_positions, segment.path_ends or segment.teacher_positions,
                                       segment.tails or [b""] * len(segment.partials))]
        owners, tokens, tails = [], [], []
        for owner, (segment, j, m, q) in enumerate(position):
            for l in range(j + 1, m):
                owners.append(owner)
                tokens.append(segment.teacher_ids[l + 1])
                tails.append(b"")
            if m > j and q:
                owners.append(owner)
                tokens.append(-1)
                tails.append(q)

        def tensor(values: list, dtype=torch.long) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        runs = tensor([projection.run(r) for r in partials]).reshape(-1, 2)
        tail_runs = tensor([projection.run(q) if q else (0, 0) for q in tails]).reshape(-1, 2)
        return cls(lows=runs[:, 0], highs=runs[:, 1],
                   columns=tensor([c for segment in segments for c in segment.columns]),
                   inside=tensor([bool(r) for r in partials], torch.bool),
                   firsts=tensor([f for segment in segments for f in segment.firsts or [-1] * len(segment.partials)]),
                   beyond=tensor([m > j for _, j, m, _ in position], torch.bool), owners=tensor(owners),
                   tokens=tensor(tokens), tail_lows=tail_runs[:, 0], tail_highs=tail_runs[:, 1])


def project(segments: list[AlignedSegment], entry_ids: Tensor | None, entry_logprobs: Tensor | HiddenRows,
            actions: Tensor, projection: Projection, *, top_k: int,
            chunk_elements: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """The teacher's entries at the segments' student positions, in order -> (ids, log-probs), (P, k + 1), over
    student ids, k = min(top_k, |V_S|).

    `entry_ids`, `entry_logprobs` (P + X, K): the teacher tokens and log-probs at each position's teacher position j
    (what a server sent; -inf pads), then at the X teacher positions of the observed paths (`path_rows`), or
    `entry_ids` None and `entry_logprobs` (P + X, V_T) over every teacher token in id order (a teacher run here:
    read through the projection's index tables, no (P, V_T) id tensor; `HiddenRows` forms those log-probs a block of
    rows at a time). Each entry whose bytes start with the position's r gives its probability to the student token
    of the projection table; entries equal to r give theirs to no one (the tail). Where r is not empty the sums are
    divided by the mass of the entries that start with r. The teacher's own next token gives the student's own next
    token `actions` (P,) its mass along the observed path: all of it where it covers that token, else times the
    teacher's probability of its further tokens inside it (docs/cross_tokenizer.md). The record is the k most likely
    student tokens plus one slot for the student's own next token when it has mass outside those k (-inf otherwise,
    and in unused slots). Where student tokens are left outside the record, at least TAIL_FLOOR of the mass stays in
    the tail (the record is scaled down where it holds more): the projection gives exact zeros (inside a teacher
    token only some student tokens continue the text), and a tail of 0 against a student tail above 0 would make
    reverse KL infinite."""
    k = min(top_k, projection.student_size)
    size = projection.student_size
    device = entry_logprobs.device
    tables = projection.tables(device)
    plan = _Plan.of(segments, projection, device)
    count = plan.columns.numel()
    actions = actions.to(device)
    first_sids = torch.where(plan.firsts >= 0, _column(plan.firsts.clamp(min=0), plan.columns, tables), -1)
    follows = (plan.firsts >= 0) & (actions >= 0) & ((first_sids != actions) | plan.beyond)
    path = _path_logprobs(plan, entry_ids, entry_logprobs, tables, count)
    out_ids = torch.zeros((count, k + 1), dtype=torch.long, device=device)
    out_lps = torch.full((count, k + 1), -math.inf, dtype=entry_logprobs.dtype, device=device)
    step = max(1, chunk_elements // max(entry_logprobs.shape[-1], size, 1))
    one_to_one = entry_ids is None and projection.one_to_one and k <= entry_logprobs.shape[-1]
    groups = {"fast": ~plan.inside & ~follows & one_to_one, "inside": plan.inside}
    groups["aligned"] = ~plan.inside & ~groups["fast"]
    for kind, chosen in groups.items():
        for rows in chosen.nonzero().squeeze(-1).split(step):
            if not rows.numel():
                continue
            own = actions[rows]
            if kind == "fast":
                out_ids[rows], out_lps[rows] = _record_one_to_one(entry_logprobs[rows], own, k, tables, size)
                continue
            dense, first_lp = _dense(plan, rows, kind == "inside", entry_ids, entry_logprobs, tables, size)
            moved = torch.where(follows[rows], first_lp + path[rows], -math.inf)
            out_ids[rows], out_lps[rows] = _record(_moved(dense, first_sids[rows], own, moved), own, k)
    return out_ids, out_lps


def _dense(plan: _Plan, rows: Tensor, inside: bool, entry_ids: Tensor | None, entry_logprobs: Tensor | HiddenRows,
           tables: ProjectionTables, size: int) -> tuple[Tensor, Tensor]:
    """The projected distribution (n, V_S) at the student positions `rows`, and the share of it (log) that the
    teacher's own next token carries (its probability over the mass of the run that starts with r)."""
    firsts = plan.firsts[rows].clamp(min=0)
    if entry_ids is None:
        lp = entry_logprobs[rows]
        first_lp = lp.gather(-1, firsts.unsqueeze(-1)).squeeze(-1)
        if not inside:
            return _every_aligned(lp, tables, size), first_lp
        dense, norm = _every_inside(lp, plan.columns[rows], plan.lows[rows], plan.highs[rows], tables, size)
        return dense, first_lp - norm
    t, lp = entry_ids[rows].long(), entry_logprobs[rows]
    first_lp = _entry_logprob(t, lp, firsts)
    if inside:
        sid, lp, norm = _continuations(t, lp, plan.columns[rows], plan.lows[rows], plan.highs[rows], tables)
        norm = torch.where(torch.isfinite(norm), norm, 0.0)
    else:  # r empty: every entry, column 0, no normalisation
        sid, norm = torch.where(torch.isfinite(lp), tables.aligned[t], -1), torch.zeros_like(lp[:, 0])
    dense = _scatter_logsumexp(torch.where(sid >= 0, lp, -math.inf), sid.clamp(min=0), size)
    return dense - norm.unsqueeze(-1), first_lp - norm


def _entry_logprob(t: Tensor, lp: Tensor, token: Tensor) -> Tensor:
    """(n, K) entries -> the log-prob each row's entries give `token` (n,) (-inf where it was not sent)."""
    return torch.where(t == token.unsqueeze(-1), lp, -math.inf).amax(-1)


def _path_logprobs(plan: _Plan, entry_ids: Tensor | None, entry_logprobs: Tensor | HiddenRows,
                   tables: ProjectionTables, count: int) -> Tensor:
    """Per student position (P,): the log-probability of the observed path past the teacher's own next token: the
    sum over the X path rows (after the P rows) of the teacher's log-prob of its own next token there, or, at the
    tail, of the mass of the tokens that start with q (0 where the path has no factor)."""
    total = torch.zeros(count, dtype=entry_logprobs.dtype, device=entry_logprobs.device)
    factors = plan.owners.numel()
    if not factors:
        return total
    rows = torch.arange(count, count + factors, device=entry_logprobs.device)
    step = max(1, (1 << 22) // max(entry_logprobs.shape[-1], 1))
    values = []
    for part in torch.arange(factors, device=rows.device).split(step):
        tokens, lows, highs = plan.tokens[part], plan.tail_lows[part], plan.tail_highs[part]
        if entry_ids is None:
            lp = entry_logprobs[rows[part]]
            exact = lp.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            run = _run_mass(lp, lows, highs, tables)
        else:
            t, lp = entry_ids[rows[part]].long(), entry_logprobs[rows[part]]
            exact = _entry_logprob(t, lp, tokens)
            ranks = tables.rank[t]
            run = torch.where((ranks >= lows[:, None]) & (ranks < highs[:, None]), lp, -math.inf).logsumexp(-1)
        values.append(torch.where(tokens >= 0, exact, run))
    return total.index_add_(0, plan.owners, torch.cat(values))


def _run_mass(lp: Tensor, lows: Tensor, highs: Tensor, tables: ProjectionTables) -> Tensor:
    """Rows over every teacher token (n, V_T) -> the log of the mass of the tokens of ranks [lows, highs) (n,)."""
    row, _, values = _run_entries(lp, lows, highs, tables)
    peak = values.new_full((lp.shape[0],), -math.inf).scatter_reduce(0, row, values, "amax")
    safe = torch.where(torch.isfinite(peak), peak, 0.0)
    total = values.new_zeros(lp.shape[0]).index_add_(0, row, (values - safe[row]).exp())
    return torch.where(torch.isfinite(peak), safe + total.log(), -math.inf)


def _moved(dense: Tensor, sources: Tensor, own: Tensor, mass: Tensor) -> Tensor:
    """The projected distribution (n, V_S) with `mass` (n,) (log; -inf: none) moved from student token `sources`
    (-1: from the tail) to `own`: the observed path's share of the teacher's own next token."""
    rows = torch.arange(dense.shape[0], device=dense.device)
    moving = torch.isfinite(mass) & (own >= 0) & (sources != own)
    if not bool(moving.any()):
        return dense
    rows, sources, own, mass = rows[moving], sources[moving], own[moving], mass[moving]
    taken = sources >= 0
    held = dense[rows[taken], sources[taken]]
    share = torch.exp(mass[taken] - held)  # of the source's mass; within rounding of 1 where it was all on the path
    left = held + torch.log1p(-share.clamp(max=1.0))
    dense[rows[taken], sources[taken]] = torch.where(share >= 1 - 64 * torch.finfo(held.dtype).eps, -math.inf, left)
    dense[rows, own] = torch.logaddexp(dense[rows, own], mass)
    return dense


def _every_aligned(lp: Tensor, tables: ProjectionTables, size: int) -> Tensor:
    """Rows with r empty over every teacher token (n, V_T) -> (n, V_S): each student token's teacher mass, summed
    relative to the row's peak."""
    peak = lp.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    total = lp.new_zeros((lp.shape[0], size)).index_add_(1, tables.targets, (lp[:, tables.sources] - peak).exp())
    return total.log() + peak


def _every_inside(lp: Tensor, columns: Tensor, lows: Tensor, highs: Tensor, tables: ProjectionTables,
                  size: int) -> tuple[Tensor, Tensor]:
    """Rows inside a teacher token over every teacher token (n, V_T) -> (n, V_S) and the log of the run's mass (n,):
    only the run of tokens that start with each row's r is read (ranks [lows, highs) of the sorted vocabulary),
    summed relative to the row's peak and divided by the run's mass."""
    n = lp.shape[0]
    row, t, values = _run_entries(lp, lows, highs, tables)
    peak = values.new_full((n,), -math.inf).scatter_reduce(0, row, values, "amax")
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    mass = (values - peak[row]).exp()
    norm = values.new_zeros(n).index_add_(0, row, mass)
    sid = _column(t, columns[row], tables)
    keep = sid >= 0
    total = values.new_zeros(n * size).index_add_(0, (row * size + sid)[keep], mass[keep])
    norm = norm.clamp(min=torch.finfo(norm.dtype).tiny)
    return (total.view(n, size) / norm.unsqueeze(-1)).log(), norm.log() + peak


def _run_entries(lp: Tensor, lows: Tensor, highs: Tensor, tables: ProjectionTables) -> tuple[Tensor, Tensor, Tensor]:
    """Rows over every teacher token (n, V_T) -> the entries of each row's run of ranks [lows, highs), flat: their
    row, teacher id and log-prob."""
    lengths = highs - lows
    row = torch.repeat_interleave(torch.arange(lp.shape[0], device=lp.device), lengths)
    offset = torch.arange(row.numel(), device=lp.device) - torch.repeat_interleave(lengths.cumsum(0) - lengths,
                                                                                    lengths)
    t = tables.order[lows[row] + offset]
    return row, t, lp[row, t]


def _column(t: Tensor, columns: Tensor, tables: ProjectionTables) -> Tensor:
    """The student token that teacher token t's bytes from offset `columns` on start with (-1: none, or none left)."""
    inside = columns < tables.widths[t]
    return torch.where(inside, tables.table[(tables.starts[t] + columns).clamp(max=tables.table.numel() - 1)], -1)


def _continuations(t: Tensor, lp: Tensor, columns: Tensor, lows: Tensor, highs: Tensor,
                   tables: ProjectionTables) -> tuple[Tensor, Tensor, Tensor]:
    """Rows inside a teacher token: entries (n, K) that start with r (their rank in [lows, highs)) keep their
    log-probs and get the student token their rest starts with (-1: none, or nothing left); the log of the mass of
    the entries that start with r is the normaliser."""
    ranks = tables.rank[t]
    starting = (ranks >= lows[:, None]) & (ranks < highs[:, None]) & torch.isfinite(lp)
    lp = torch.where(starting, lp, -math.inf)
    sid = torch.where(starting, _column(t, columns[:, None].expand_as(t), tables), -1)
    return sid, lp, torch.logsumexp(lp, -1)


def _record(dense: Tensor, own: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Projected log-probs (n, V_S) -> the top k and the own-token slot (`_slots`)."""
    top = dense.topk(k, dim=-1)
    own_lp = dense.gather(-1, own.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return _slots(top.values, top.indices, own, own_lp, student_size=dense.shape[-1])


def _record_one_to_one(lp: Tensor, own: Tensor, k: int, tables: ProjectionTables,
                       size: int) -> tuple[Tensor, Tensor]:
    """Rows with r empty over every teacher token (n, V_T), the map one-to-one: the top k taken over the teacher's
    ids and renamed, with no (n, V_S) tensor; the same record as `_record` over the projected distribution."""
    mapped = tables.aligned
    values = lp if tables.sources.numel() == mapped.numel() else lp.masked_fill(mapped < 0, -math.inf)
    top = values.topk(k, dim=-1)
    twin = tables.twins[own.clamp(min=0)]
    own_lp = torch.where(twin >= 0, lp.gather(-1, twin.clamp(min=0).unsqueeze(-1)).squeeze(-1), -math.inf)
    return _slots(top.values, mapped[top.indices].clamp(min=0), own, own_lp, student_size=size)


def _slots(values: Tensor, ids: Tensor, own: Tensor, own_lp: Tensor, *, student_size: int) -> tuple[Tensor, Tensor]:
    """The top k (values, ids) and the own-token slot (own's log-prob where it is not among them), with TAIL_FLOOR
    left to the tail where student tokens are outside the record."""
    fresh = (own >= 0) & ~((ids == own.unsqueeze(-1)) & torch.isfinite(values)).any(-1)
    record = torch.cat([values, torch.where(fresh, own_lp, -math.inf).unsqueeze(-1)], -1)
    if values.shape[-1] < student_size:  # the tail holds student tokens: keep TAIL_FLOOR of the mass there
        covered = torch.logsumexp(record, -1, keepdim=True)
        record = record - (covered - math.log1p(-TAIL_FLOOR)).clamp(min=0.0)
    return torch.cat([ids, own.clamp(min=0).unsqueeze(-1)], -1), record


def _scatter_logsumexp(values: Tensor, index: Tensor, size: int) -> Tensor:
    """(n, K) log-values grouped by `index` into (n, size): log sum exp of each group (-inf for none); exact (no
    exp/log round trip) for a group of one."""
    peak = values.new_full((values.shape[0], size), -math.inf).scatter_reduce(-1, index, values, "amax")
    shift = peak.gather(-1, index)
    safe = torch.where(torch.isfinite(shift), shift, 0.0)
    total = values.new_zeros((values.shape[0], size)).scatter_add(-1, index, (values - safe).exp())
    return torch.where(torch.isfinite(peak), peak + total.log(), -math.inf)
