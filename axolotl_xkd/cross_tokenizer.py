"""Distillation across tokenizers: the one home of the vocabulary map and the byte-span alignment that turn a
teacher's next-token distributions over its own tokens into a top-k signal at the student's positions.

The student's text of a sequence is the concatenation of its tokens' bytes; the teacher re-tokenizes that text.
A student position i whose prefix u_<=i ends at byte b, where a teacher prefix also ends, gets the teacher's
distribution at that teacher position, expressed in student ids through the vocabulary map (tokens whose byte
strings are equal); the teacher's mass on tokens without a student twin stays in the top-k tail. Every other
position gets an empty record (the tail holds everything): no divergence there, counted as not covered.
docs/cross_tokenizer.md has the math and the rules for special tokens, BOS and leading spaces.

Imports torch and the loss's signal type; reads tokenizers through their own (fast) backend. Knows nothing of the
trainer, Axolotl or the config schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from axolotl_xkd.frozen_teacher import SPECIAL_TOKENS, special_tokens

KEY = "xkd.teacher.cross_tokenizer"
"""The config key that allows a teacher of another tokenizer; errors name it."""


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

    Added tokens (chat markers and the like) stand for their own content, as the chat template renders them.
    """
    steps = _decoder_steps(tokenizer, where)
    zero_width = {i for i in special_tokens(tokenizer).values() if i is not None}
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [None if i in zero_width or token is None else added[i].encode() if i in added else _piece(token, steps)
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

    def teacher_ids(self) -> Tensor:
        """student id -> teacher id (-1: none), the inverse map."""
        inverse = torch.full((self.student_size,), -1, dtype=torch.long)
        mapped = (self.student_ids >= 0).nonzero().squeeze(-1)
        inverse[self.student_ids[mapped]] = mapped
        return inverse

    def digest(self) -> str:
        """sha256 of the map: a store built for another pair of tokenizers has another digest."""
        payload = json.dumps({"student_size": self.student_size, "map": self.student_ids.tolist()})
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class AlignedSegment:
    """One student sequence re-tokenized by the teacher: the teacher's ids and the aligned position pairs."""

    teacher_ids: list[int]
    student_positions: list[int]
    teacher_positions: list[int]


def _prefix_ends(pieces: list[bytes]) -> list[int]:
    """Byte offset where each prefix ends: token i's prefix u_<=i covers bytes [0, ends[i])."""
    ends, total = [], 0
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    return ends


def _strip_dummy_prefix(pieces: list[bytes]) -> list[bytes]:
    """Drop the leading space a sentencepiece-style tokenizer adds to a text (its decoder strips it too)."""
    first = next((k for k, p in enumerate(pieces) if p), None)
    if first is None or not pieces[first].startswith(b" "):
        return pieces
    return [*pieces[:first], pieces[first][1:], *pieces[first + 1:]]


def _drop_dummy_spaces(pieces: list[bytes], ids: list[int], added: set[int], data: bytes) -> list[bytes]:
    """The teacher's side of the dummy prefix: a sentencepiece-style tokenizer puts a space before the text and
    (prepend_scheme 'always') again after each added token; drop it there, where the student's text has none."""
    out, at, fresh = [], 0, True
    for piece, token in zip(pieces, ids):
        if fresh and piece.startswith(b" ") and not data.startswith(b" ", at):
            piece = piece[1:]
        fresh = token in added if piece else fresh
        out.append(piece)
        at += len(piece)
    return out


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
        self.student_dummy = self._adds_dummy_prefix(student, self.student_pieces)
        self.teacher_dummy = self._adds_dummy_prefix(teacher, self.teacher_pieces)
        self.teacher_leading = self._leading_specials(teacher)
        self.teacher_added = set(teacher.added_tokens_decoder)

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
        """Re-tokenize one student sequence with the teacher and pair the positions whose prefixes end at the same
        byte: position i (predicting u_{i+1}) with the last teacher position j whose prefix t_<=j covers the same
        bytes. Raises, naming `where`, when the teacher's tokens do not spell the student's text."""
        pieces = _joined(self.student_pieces, student_ids)
        pieces = _strip_dummy_prefix(pieces) if self.student_dummy else pieces
        data = _utf8_text(b"".join(pieces), where)
        text = data.decode("utf-8")
        teacher_ids = self.teacher_leading + self.teacher(text, add_special_tokens=False)["input_ids"]
        teacher_pieces = _joined(self.teacher_pieces, teacher_ids)
        if self.teacher_dummy:
            teacher_pieces = _drop_dummy_spaces(teacher_pieces, teacher_ids, self.teacher_added, data)
        spelled = b"".join(teacher_pieces)
        if spelled != data:
            at = next((k for k, (a, b) in enumerate(zip(spelled, data)) if a != b), min(len(spelled), len(data)))
            raise ValueError(
                f"{where}: the text does not survive decode and re-encode ({KEY}): the student's tokens spell "
                f"{data[max(0, at - 20): at + 20]!r} around byte {at}, the teacher's re-tokenization spells "
                f"{spelled[max(0, at - 20): at + 20]!r} (a normalizer or unknown characters). Clean the row's text "
                "or use a teacher whose tokenizer keeps it as it is."
            )
        last = {end: j for j, end in enumerate(_prefix_ends(teacher_pieces))}
        pairs = [(i, last[end]) for i, end in enumerate(_prefix_ends(pieces)) if end in last and end <= len(data)]
        return AlignedSegment(teacher_ids, [i for i, _ in pairs], [j for _, j in pairs])


def express(teacher_logprobs: Tensor, actions: Tensor, vocab: VocabMap, inverse: Tensor, *,
            top_k: int) -> tuple[Tensor, Tensor]:
    """Teacher log-probs (P, V_T) over its own tokens -> (ids, log-probs), (P, k + 1), over student ids.

    The k most likely teacher tokens that have a student twin, plus one slot for the student's own next token
    `actions` (P,) when it has a teacher twin outside those k (so td_target teacher_logprob reads its exact
    log-prob); unused slots are -inf. Mass on teacher tokens without a twin is left to the tail.
    """
    map_ = vocab.student_ids.to(teacher_logprobs.device)
    twin = inverse.to(actions.device)[actions.clamp(min=0)]
    own = torch.where((actions >= 0) & (twin >= 0), twin, -1)
    return _express(map_.expand_as(teacher_logprobs), teacher_logprobs, own, actions, k=min(top_k, vocab.exact))


def express_sparse(teacher_ids: Tensor, teacher_logprobs: Tensor, actions: Tensor, vocab: VocabMap, *,
                   top_k: int) -> tuple[Tensor, Tensor]:
    """`express` for a teacher that sent only some of its log-probs: entries (P, K) of teacher ids and log-probs
    (-inf: padding) -> (ids, log-probs), (P, k + 1), over student ids, k = min(top_k, K, mapped tokens).

    The same rule over what was sent: the k most likely entries with a student twin, plus the student's own next
    token when its twin is among the entries but outside those k. A token that was not sent is in the tail. On
    all V_T entries (in any order) it equals `express`.
    """
    student = vocab.student_ids.to(teacher_ids.device)[teacher_ids]
    match = (student == actions.unsqueeze(-1)) & torch.isfinite(teacher_logprobs) & (actions >= 0).unsqueeze(-1)
    own = torch.where(match.any(-1), match.long().argmax(-1), -1)
    k = min(top_k, teacher_ids.shape[-1], vocab.exact)
    return _express(student, teacher_logprobs, own, actions, k=k)


def _express(student: Tensor, logprobs: Tensor, own: Tensor, actions: Tensor, *, k: int) -> tuple[Tensor, Tensor]:
    """The rule `express` and `express_sparse` share. Entries (P, K): `student` their student ids (-1: no twin),
    `logprobs` the teacher's; `own` (P,) the entry holding the twin of the student's next token `actions` (-1:
    none). The k most likely mapped entries, then the own slot (-inf unless its entry is outside them)."""
    top = torch.where(student >= 0, logprobs, -math.inf).topk(k, dim=-1)
    picked = student.gather(-1, top.indices)
    ids = picked.clamp(min=0)
    lps = torch.where(picked >= 0, top.values, -math.inf)
    seen = ((ids == actions.unsqueeze(-1)) & torch.isfinite(lps)).any(-1)
    own_lp = logprobs.gather(-1, own.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    own_lp = torch.where((own >= 0) & ~seen, own_lp, -math.inf)
    return (torch.cat([ids, torch.where(own >= 0, actions, 0).unsqueeze(-1)], -1),
            torch.cat([lps, own_lp.unsqueeze(-1)], -1))
