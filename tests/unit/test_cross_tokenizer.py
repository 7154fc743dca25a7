"""Distillation across tokenizers: the vocabulary map, the byte-span alignment and its edge cases
(cross_tokenizer.py), on three tokenizers built in code that really differ: the tiny character tokenizer (BOS, no
merges), a byte-level BPE (`Ġ`, no BOS) and a sentencepiece-style BPE (`▁`, dummy prefix, BOS, byte fallback)."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from tokenizers import normalizers
from transformers import ByT5Tokenizer

from axolotl_xkd.cross_tokenizer import KEY, Aligner, VocabMap, express, express_sparse, token_pieces
from axolotl_xkd.losses.categories import TAIL_FLOOR, teacher_token_logprob
from axolotl_xkd.tiny import arithmetic_rows, build_bpe_tokenizer, build_tokenizer

WORDS = ["the sum is", "the answer is", "what is the sum", "naïve café", "日本 is here", "hello there"]


def corpus() -> list[str]:
    return [r["prompt"] + r["response"] for r in arithmetic_rows(300, seed=0)] + WORDS * 20


@cache
def byte_level():
    return build_bpe_tokenizer(corpus(), style="byte_level", vocab_size=300)


@cache
def sentencepiece():
    return build_bpe_tokenizer(corpus(), style="sentencepiece", vocab_size=140)


def ids_of(tokenizer, text: str) -> list[int]:
    """The student's sequence: its own specials, the text, then EOS."""
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def pieces_of(tokenizer, ids: list[int]) -> list[bytes | None]:
    table = token_pieces(tokenizer, "test")
    return [table[i] for i in ids]


def test_leading_space_conventions_map_exactly():
    """Byte-level `Ġthe` and sentencepiece `▁the` are the same token: b' the'."""
    bl, sp = byte_level(), sentencepiece()
    vocab = VocabMap.build(token_pieces(bl, "s"), token_pieces(sp, "t"), {}, {})
    for word in (" the", " is"):
        student = bl.convert_tokens_to_ids(word.replace(" ", "Ġ"))
        teacher = sp.convert_tokens_to_ids(word.replace(" ", "\u2581"))
        assert student != bl.unk_token_id and teacher != sp.unk_token_id
        assert int(vocab.student_ids[teacher]) == student


def test_eos_and_bos_map_by_role():
    student, teacher = build_tokenizer(), sentencepiece()
    teacher.eos_token = "<unk>"  # another string designated EOS: still the student's EOS
    aligner = Aligner(student, teacher, "test")
    assert int(aligner.vocab.student_ids[teacher.unk_token_id]) == student.eos_token_id
    assert int(aligner.vocab.student_ids[teacher.bos_token_id]) == student.bos_token_id


def test_identical_tokenizers_align_every_position_with_itself():
    tokenizer = sentencepiece()
    aligner = Aligner(tokenizer, tokenizer, "test")
    ids = ids_of(tokenizer, "what is the sum 3+4=7 naïve 日本")
    segment = aligner.segment(ids, "row 0")
    assert segment.teacher_ids == ids[:-1]  # the EOS is predicted, never fed
    assert segment.student_positions == list(range(len(ids)))
    assert segment.teacher_positions == [*range(len(ids) - 1), len(ids) - 2]
    assert torch.equal(aligner.vocab.student_ids, torch.arange(len(tokenizer)))


def test_multibyte_character_split_differently():
    """'日' is one sentencepiece token but three byte-level tokens: positions inside the character are not aligned,
    the positions before and after it are."""
    student, teacher = byte_level(), sentencepiece()
    text = "a日b"
    ids = student(text)["input_ids"]
    pieces = pieces_of(student, ids)
    assert len([p for p in pieces if p and p[0] >= 0x80]) > 1  # split by the student, whole in the teacher
    assert "日" in sentencepiece().convert_ids_to_tokens(sentencepiece()(text)["input_ids"])
    segment = Aligner(student, teacher, "test").segment(ids, "row 0")
    ends = [sum(len(p or b"") for p in pieces[: i + 1]) for i in range(len(pieces))]
    start = text.encode().index("日".encode())
    inside = [i for i, e in enumerate(ends) if start < e < start + 3]
    assert inside and not set(inside) & set(segment.student_positions)
    assert {ends.index(start), ends.index(start + 3)} <= set(segment.student_positions)


def test_bos_on_one_side_only():
    """The character tokenizer's BOS (prefix of zero bytes) pairs with the sentencepiece teacher's BOS, and has no
    partner in the byte-level teacher, which has no BOS."""
    student = build_tokenizer()
    ids = ids_of(student, "3+4=7")
    with_bos = Aligner(student, sentencepiece(), "test").segment(ids, "row 0")
    without = Aligner(student, byte_level(), "test").segment(ids, "row 0")
    assert with_bos.teacher_ids[0] == sentencepiece().bos_token_id
    assert (with_bos.student_positions[0], with_bos.teacher_positions[0]) == (0, 0)
    assert byte_level().bos_token_id not in without.teacher_ids and 0 not in without.student_positions
    assert without.student_positions[0] == 1


def test_dummy_prefix_is_not_text():
    """The sentencepiece student writes 'hi there' as '▁hi ▁there': its dummy prefix is no byte of the text, so the
    byte-level teacher re-tokenizes 'hi there' (not ' hi there') and the word boundary aligns."""
    student, teacher = sentencepiece(), byte_level()
    ids = ids_of(student, "hello there")
    segment = Aligner(student, teacher, "test").segment(ids, "row 0")
    assert teacher.decode(segment.teacher_ids) == "hello there"
    pieces = pieces_of(student, ids)
    boundary = next(i for i, p in enumerate(pieces) if p and p.startswith(b" ") and i > 1) - 1
    assert boundary in segment.student_positions


def test_added_special_tokens_map_by_content():
    """A chat marker both tokenizers added (at different ids) is one token on each side, mapped and aligned."""
    student, teacher = build_tokenizer(), sentencepiece()
    student.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    teacher.add_special_tokens({"additional_special_tokens": ["<|x|>", "<|im_start|>"]})
    aligner = Aligner(student, teacher, "test")
    s_id, t_id = student.convert_tokens_to_ids("<|im_start|>"), teacher.convert_tokens_to_ids("<|im_start|>")
    assert s_id != t_id and int(aligner.vocab.student_ids[t_id]) == s_id
    ids = ids_of(student, "<|im_start|>3+4=7")
    segment = aligner.segment(ids, "row 0")
    assert t_id in segment.teacher_ids
    assert 0 in segment.student_positions and 1 in segment.student_positions  # predicting the marker, and after it


def test_chat_template_compares_the_students_rendering():
    """The teacher reads the student's rendered text: its own chat template is never applied."""
    student, teacher = build_tokenizer(), sentencepiece()
    student.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    teacher.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }};{% endfor %}"
    messages = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]
    ids = student.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    segment = Aligner(student, teacher, "test").segment(ids, "row 0")
    rendered = student.apply_chat_template(messages, tokenize=False)
    assert teacher.decode(segment.teacher_ids, skip_special_tokens=True) == rendered
    assert rendered != teacher.apply_chat_template(messages, tokenize=False)


def test_text_that_does_not_survive_reencoding_names_the_row():
    student, teacher = build_tokenizer(), build_bpe_tokenizer(corpus(), style="byte_level", vocab_size=300)
    teacher.backend_tokenizer.normalizer = normalizers.Lowercase()
    aligner = Aligner(student, teacher, "test")
    with pytest.raises(ValueError, match=r"batch row 3 .*does not survive decode and re-encode"):
        aligner.segment(ids_of(student, "What is 3+4"), "batch row 3 (tokens 0..12)")


def test_slow_tokenizer_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=rf"slow tokenizer.*{KEY}"):
        Aligner(build_tokenizer(), ByT5Tokenizer(), "xkd.teacher.path='t5'")


def test_truncated_character_drops_only_its_bytes():
    """A row cut inside a character: the teacher reads the text up to the character; nothing after it aligns."""
    student, teacher = byte_level(), sentencepiece()
    ids = student("ab 日")["input_ids"][:-1]  # the last byte of '日' cut off
    segment = Aligner(student, teacher, "test").segment(ids, "row 0")
    assert teacher.decode(segment.teacher_ids, skip_special_tokens=True) == "ab "
    assert len(ids) - 1 not in segment.student_positions and len(ids) - 2 in segment.student_positions


def test_express_keeps_unmapped_mass_in_the_tail_and_the_students_token():
    """Top-k over mapped teacher tokens in student ids; unmapped mass left out (the tail); the student's own token
    gets its exact log-prob even outside the top k, so td_target teacher_logprob reads it."""
    student, teacher = build_tokenizer(), sentencepiece()
    aligner = Aligner(student, teacher, "test")
    vocab, inverse = aligner.vocab, aligner.vocab.teacher_ids()
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, vocab.teacher_size, generator=g, dtype=torch.float64) * 3, -1)
    mapped = (vocab.student_ids >= 0).nonzero().squeeze(-1)
    ranked = mapped[lp[0, mapped].argsort(descending=True)]
    outside = int(vocab.student_ids[ranked[-1]])  # the least likely mapped token: outside any small top k
    best = int(vocab.student_ids[mapped[lp[2, mapped].argmax()]])
    actions = torch.tensor([outside, -1, best])
    ids, lps = express(lp, actions, vocab, inverse, top_k=4)
    assert ids.shape == (3, 5)
    assert torch.equal(ids[0, :4], vocab.student_ids[ranked[:4]])
    torch.testing.assert_close(lps[0, :4], lp[0, ranked[:4]])
    assert int(ids[0, 4]) == outside and float(lps[0, 4]) == float(lp[0, ranked[-1]])
    assert math.isinf(float(lps[1, 4])) and math.isinf(float(lps[2, 4]))  # no action / already in the top k
    got = teacher_token_logprob(_signal(ids, lps), actions.clamp(min=0), temperature=1.0, topk_tail=True,
                                vocab_size=len(student))
    assert float(got[0]) == float(lp[0, ranked[-1]])
    assert float(got[2]) == float(lp[2, int(inverse[actions[2]])])


def test_sparse_express_on_the_whole_vocabulary_equals_express():
    """Given every teacher token, in any order, the sparse rule keeps what the dense one keeps, slot for slot: the
    k most likely mapped tokens, then the student's own token outside them (or -inf)."""
    student, teacher = build_tokenizer(), sentencepiece()
    vocab = Aligner(student, teacher, "test").vocab
    inverse = vocab.teacher_ids()
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(4, vocab.teacher_size, generator=g, dtype=torch.float64) * 3, -1)
    mapped = (vocab.student_ids >= 0).nonzero().squeeze(-1)
    least, best = (vocab.student_ids[mapped[lp[r, mapped].argsort()[0 if r == 0 else -1]]] for r in (0, 2))
    no_twin = (inverse < 0).nonzero().squeeze(-1)
    actions = torch.tensor([int(least), -1, int(best), int(no_twin[0]) if no_twin.numel() else 0])
    order = torch.stack([torch.randperm(vocab.teacher_size, generator=g) for _ in range(4)])
    for top_k in (4, vocab.exact + 5):
        want_ids, want_lps = express(lp, actions, vocab, inverse, top_k=top_k)
        got_ids, got_lps = express_sparse(order, lp.gather(-1, order), actions, vocab, top_k=top_k)
        assert torch.equal(got_ids, want_ids) and torch.equal(got_lps, want_lps)
        # top 4: the least likely token comes through the own slot; all mapped tokens: it is in the record
        assert math.isfinite(float(want_lps[0, -1])) == (top_k == 4)


def test_sparse_express_matches_the_float64_reference_of_what_was_sent():
    """A server sends its top 5 and the log-prob of the prompt's next token; the record keeps the 3 most likely of
    them with a student twin, plus the student's own token when it was sent. Written from dicts: an unsent or
    unmapped token is in the tail, so td_target teacher_logprob reads the exact log-prob of a sent token and the
    tail's share (floored, spread over the tokens outside the record) of any other."""
    student, teacher = build_tokenizer(), sentencepiece()
    vocab = Aligner(student, teacher, "test").vocab
    m = vocab.student_ids.tolist()
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, vocab.teacher_size, generator=g, dtype=torch.float64) * 3
    lp = torch.log_softmax(logits + 4.0 * (vocab.student_ids >= 0), -1)  # mapped tokens lead, unmapped ones mix in
    top = lp.topk(5, dim=-1).indices
    below = [[t for t in lp[r].argsort(descending=True)[5:].tolist() if m[t] >= 0] for r in range(6)]
    prompt = torch.tensor([below[r][r % 3] for r in range(6)])  # the teacher's next token, ranked below 5
    sent_ids = torch.cat([top, prompt[:, None]], -1)
    sent_lps = lp.gather(-1, sent_ids)
    best = [next(m[t] for t in row if m[t] >= 0) for row in top.tolist()]
    # sent outside the record's 3 (own slot), in the record, not sent (tail), none, own slot, not sent
    actions = torch.tensor([m[int(prompt[0])], best[1], m[below[2][4]], -1, m[int(prompt[4])], m[below[5][7]]])
    ids, lps = express_sparse(sent_ids, sent_lps, actions, vocab, top_k=3)
    assert ids.shape == (6, 4)
    td = teacher_token_logprob(_signal(ids, lps), actions.clamp(min=0), temperature=1.0, topk_tail=True,
                               vocab_size=len(student))
    for r in range(6):
        entries = {m[t]: float(lp[r, t]) for t in sent_ids[r].tolist() if m[t] >= 0}
        kept = sorted(entries, key=lambda s: -entries[s])[:3]
        action = int(actions[r])
        if action in entries and action not in kept:
            kept.append(action)
        record = {int(i): float(v) for i, v in zip(ids[r], lps[r]) if math.isfinite(float(v))}
        assert record == {s: entries[s] for s in kept}
        if action < 0:
            continue
        tail = max(1.0 - sum(math.exp(v) for v in record.values()), TAIL_FLOOR)
        want = entries[action] if action in entries else math.log(tail) - math.log(len(student) - len(record))
        assert float(td[r]) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert [math.isfinite(float(v)) for v in lps[:, 3]] == [True, False, False, False, True, False]


def _signal(ids, lps):
    from axolotl_xkd.losses.signal import TopKSignal

    signal = TopKSignal(token_ids=ids, logprobs=lps)
    signal.validate(vocab_size=int(ids.max()) + 1)
    return signal
