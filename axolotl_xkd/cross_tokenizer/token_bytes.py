"""Token bytes: what each token of a tokenizer adds to the text, read from its own decoder, and the vocabulary map
that pairs teacher and student tokens of the same bytes (docs/cross_tokenizer.md).

Imports torch and the frozen-teacher rule's special tokens; knows nothing of the trainer, Axolotl or the schema.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from axolotl_xkd.frozen_teacher import SPECIAL_TOKENS, special_tokens

KEY = "xkd.teacher.cross_tokenizer"
"""The config key that allows a teacher of another tokenizer; errors name it."""

RULE = "prefix-projection, observed path"
"""How records are made (docs/cross_tokenizer.md), part of the digest a cross-tokenizer store's manifest keeps."""

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
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
        if step["type"] == "ByteFallback" and (match := BYTE_FALLBACK.fullmatch(token)):
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


def joined(pieces: list[bytes | None], ids: list[int]) -> list[bytes]:
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

    @classmethod
    def of(cls, student, teacher, where: str) -> VocabMap:
        """The map between two tokenizers, read from their decoders (errors name `where`)."""
        return cls.build(token_pieces(student, f"{where} (the student's tokenizer)"),
                         token_pieces(teacher, f"{where} (the teacher's tokenizer)"),
                         special_tokens(student), special_tokens(teacher))

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
