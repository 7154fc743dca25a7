"""What makes a model usable as the student's teacher, written once for the three teacher sources (in-process
model, precomputed store, server): the same-tokenizer rule, the fingerprint that carries it into a store's
manifest or a server's model card, and the one loader of a frozen teacher.

The rule: the teacher's tokenizer has as many tokens as the student's and maps every token (special and added
ones included) to the same id. X-KD compares next-token distributions id by id, so any other difference would
pair unrelated tokens: refused. Which id is BOS, EOS, PAD or UNK may differ (Axolotl's `special_tokens:` can
re-designate them for the student): the distributions still compare id by id and the loss's terminals use the
student's EOS, so a different designation is a warning, never a refusal.

Imports the standard library at module level (the server client uses the rule without torch); torch and
transformers only inside the functions that need them. Knows nothing of Axolotl, the trainer or the config schema.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

LOG = logging.getLogger("axolotl_xkd")

SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def _identity(tokenizer) -> tuple[int, dict[str, int]]:
    """What the rule compares: the number of tokens and the token -> id map (added tokens included)."""
    return len(tokenizer), tokenizer.get_vocab()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what the rule compares: two tokenizers the rule accepts have the same hash, and only those."""
    size, vocab = _identity(tokenizer)
    return hashlib.sha256(json.dumps({"size": size, "vocab": sorted(vocab.items())}).encode()).hexdigest()


def special_tokens(tokenizer) -> dict[str, int | None]:
    """The ids designated BOS, EOS, PAD and UNK (None where the tokenizer has none)."""
    return {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKENS}


def warn_other_special_tokens(student: dict[str, int | None], teacher: dict[str, int | None], where: str) -> None:
    """Log each special-token designation that differs; the rule accepts them (X-KD uses the student's)."""
    for name in SPECIAL_TOKENS:
        if name in teacher and student.get(name) != teacher[name]:
            LOG.warning("%s: %s is %s for the student but %s for the teacher; X-KD uses the student's",
                        where, name, student.get(name), teacher[name])


def check_same_tokenizer(student, teacher, where: str) -> None:
    """Raise unless `teacher` passes the same-tokenizer rule against `student`; warn on other special tokens."""
    (s_size, s_vocab), (t_size, t_vocab) = _identity(student), _identity(teacher)
    if s_size != t_size or s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:5]
        raise ValueError(
            f"{where}: the teacher's tokenizer ({t_size} tokens) differs from the student's "
            f"({s_size} tokens); only in the student: {only_s}, only in the teacher: {only_t}, "
            f"different ids: {moved}. X-KD compares next-token distributions id by id, so both must use "
            "the same tokenizer. Point xkd.teacher.tokenizer_path / the student's tokenizer_config at the "
            "same tokenizer, distil from a precomputed top-k dataset made with the student's tokenizer, or "
            "(in-process teacher) set xkd.teacher.cross_tokenizer: true to align the teacher's tokens with the "
            "student's (docs/cross_tokenizer.md)."
        )
    warn_other_special_tokens(special_tokens(student), special_tokens(teacher), where)


def output_layer_is_linear(model: nn.Module) -> bool:
    """True when `model`'s logits are its decoder's last hidden state times a plain Linear output layer.

    Softcapped (Gemma 2), scaled (Cohere) or adapter-wrapped output layers are not, and keep full logits.
    """
    from torch import nn

    config = model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    return type(model.get_output_embeddings()) is nn.Linear and hasattr(model, "get_decoder")


def load_frozen_teacher(path: str, *, dtype: torch.dtype, student_tokenizer=None, tokenizer_path: str | None = None,
                        attn_implementation: str | None = None, trust_remote_code: bool = False,
                        where: str | None = None, cross_tokenizer: bool = False):
    """(model, tokenizer): the teacher at `path` without gradients, in eval mode, where from_pretrained put it.

    Its tokenizer (from `tokenizer_path`, else `path`) must pass the same-tokenizer rule against
    `student_tokenizer` (a server, which has no student, passes None; `cross_tokenizer` lifts the rule), and its
    output layer must score every token. `where` names the teacher in errors (default: the path). Used by the
    in-process teacher source, `axolotl xkd precompute` and `axolotl xkd serve-teacher`, so all three load a
    teacher alike.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_xkd.distributed import full_shape

    where = where or f"teacher {path!r}"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, trust_remote_code=trust_remote_code)
    if student_tokenizer is not None and not cross_tokenizer:
        check_same_tokenizer(student_tokenizer, tokenizer, where)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    vocab_size = len(tokenizer)
    rows = full_shape(model.get_output_embeddings().weight)[0]  # the full size, also when ZeRO-3 partitions it
    if rows < vocab_size:
        raise ValueError(f"{where}: the teacher's output layer has {rows} rows but the tokenizer has {vocab_size} "
                         "tokens; the teacher cannot score every token.")
    return model.requires_grad_(False).eval(), tokenizer
