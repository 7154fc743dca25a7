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

from axolotl_xkd.cross_tokenizer import KEY, AlignedSegment, Aligner, VocabMap, project, token_pieces
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
    """'日' is one sentencepiece token but three byte-level tokens: the positions before and after it are aligned, the
    positions inside the character read the teacher's distribution before it with the character's bytes so far."""
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
    assert inside and not set(inside) & set(segment.aligned)
    assert {ends.index(start), ends.index(start + 3)} <= set(segment.aligned)
    partial = dict(zip(segment.student_positions, segment.partials))
    assert [partial[i] for i in inside] == ["日".encode()[: e - start] for e in (ends[i] for i in inside)]


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
    assert boundary in segment.aligned


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
    assert 0 in segment.aligned and 1 in segment.aligned  # predicting the marker, and after it


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


def test_text_the_teacher_spells_otherwise_loses_only_the_changed_span(caplog):
    """A normalizer that changes the text (here lowercasing): the positions whose partial bytes or next token touch a
    changed byte get no teacher position; the rest of the row is aligned, and the row is logged by name."""
    student, teacher = build_tokenizer(), build_bpe_tokenizer(corpus(), style="byte_level", vocab_size=300)
    teacher.backend_tokenizer.normalizer = normalizers.Lowercase()
    aligner = Aligner(student, teacher, "test")
    ids = ids_of(student, "What is 3+4 and What")
    with caplog.at_level("WARNING", logger="axolotl_xkd"):
        segment = aligner.segment(ids, "batch row 3 (tokens 0..12)")
    assert "batch row 3 (tokens 0..12)" in caplog.text and KEY in caplog.text
    # the character student: BOS, then byte b at token b + 1; the teacher's `what` spans bytes 0-4 and 16-20, so
    # positions 0-3 and 16-19 predict or sit inside a changed word; the rest, EOS and after included, is aligned
    assert segment.student_positions == [*range(4, 16), 20, 21]


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


def one_position(partial: bytes) -> AlignedSegment:
    """A segment of one student position that reads teacher position 0 with the partial bytes r."""
    return AlignedSegment([], [0], [0], [partial], [len(partial)], [len(partial)], [-1], [0], [b""])


def teacher_row(teacher, probs: dict[str, float]) -> torch.Tensor:
    """Log-probs over the teacher's vocabulary (1, V_T): the given tokens their probabilities, the rest of the mass
    spread evenly over every other token."""
    ids = {teacher.convert_tokens_to_ids(token): p for token, p in probs.items()}
    assert teacher.unk_token_id not in ids
    rest = (1.0 - sum(ids.values())) / (len(teacher) - len(ids))
    return torch.tensor([[math.log(ids.get(t, rest)) for t in range(len(teacher))]], dtype=torch.float64)


def record_of(ids: torch.Tensor, lps: torch.Tensor, student) -> dict[str, float]:
    return {student.convert_ids_to_tokens(int(i)): math.exp(float(v))
            for i, v in zip(ids[0], lps[0]) if math.isfinite(float(v))}


def test_a_longer_teacher_token_gives_its_mass_to_the_student_token_it_starts_with():
    """Where both prefixes end at the same byte, the teacher's ` the` (no twin in the character student) counts for
    the student's ` `, its ` is` too: every teacher token's mass lands on the student token its bytes start with."""
    student, teacher = build_tokenizer(), byte_level()
    aligner = Aligner(student, teacher, "test")
    lp = teacher_row(teacher, {"Ġthe": 0.5, "Ġis": 0.2, "t": 0.1})
    every = torch.arange(len(teacher)).expand_as(lp)
    ids, lps = project([one_position(b"")], every, lp, torch.tensor([-1]), aligner.projection, top_k=len(student))
    record = record_of(ids, lps, student)
    spread = 0.2 / (len(teacher) - 3)
    space = sum(1 for t in range(len(teacher)) if (teacher.convert_ids_to_tokens(t) or "").startswith("Ġ"))
    assert record[" "] == pytest.approx(0.7 + spread * (space - 2), rel=1e-9)
    assert record["t"] > 0.1 and record["</s>"] == pytest.approx(spread, rel=1e-9)  # EOS maps by role


def test_inside_a_teacher_token_the_continuation_is_normalised_over_the_tokens_that_start_with_r():
    """The student has written ` t` of the teacher's next token: the teacher tokens that start with b' t' give their
    mass to the student token their rest starts with (` th`... -> `h`), divided by the mass of all of them; the
    teacher token that is exactly ` t` says nothing about the next byte (the tail)."""
    student, teacher = build_tokenizer(), byte_level()
    aligner = Aligner(student, teacher, "test")
    starting = [t for t in range(len(teacher)) if (teacher.convert_ids_to_tokens(t) or "").startswith("Ġt")]
    lp = teacher_row(teacher, {"Ġthe": 0.5, "Ġis": 0.2})
    every = torch.arange(len(teacher)).expand_as(lp)
    ids, lps = project([one_position(b" t")], every, lp, torch.tensor([-1]), aligner.projection, top_k=len(student))
    record = record_of(ids, lps, student)
    spread = 0.3 / (len(teacher) - 2)
    norm = 0.5 + spread * (len(starting) - 1)
    assert record["h"] >= 0.5 / norm and sum(record.values()) <= 1.0 + 1e-12
    exact = teacher.convert_tokens_to_ids("Ġt") in starting
    assert sum(record.values()) == pytest.approx(1.0 - exact * spread / norm, rel=1e-9)


def test_a_record_that_holds_all_the_mass_leaves_the_floor_to_the_tail():
    """Inside ` th` only a few characters continue the text: the record would hold all the mass, and reverse KL
    against a student with mass elsewhere would be infinite. The record keeps TAIL_FLOOR for the tail, and the
    loss and its gradient are finite."""
    from axolotl_xkd.losses.categories import paired_categories
    from axolotl_xkd.losses.divergence import reverse_kl

    student, teacher = build_tokenizer(), byte_level()
    aligner = Aligner(student, teacher, "test")
    lp = teacher_row(teacher, {"Ġthe": 0.5, "Ġthere": 0.2})
    every = torch.arange(len(teacher)).expand_as(lp)
    ids, lps = project([one_position(b" th")], every, lp, torch.tensor([-1]), aligner.projection, top_k=8)
    unfloored = project([one_position(b" th")], every, lp, torch.tensor([-1]), aligner.projection,
                        top_k=len(student))
    assert float(torch.logsumexp(unfloored[1][0, :-1], -1).exp()) == pytest.approx(1.0, rel=1e-12)
    assert float(torch.logsumexp(lps[0], -1).exp()) == pytest.approx(1.0 - TAIL_FLOOR, rel=1e-12)
    logits = torch.randn(1, 1, len(student), dtype=torch.float64, requires_grad=True)
    pair = paired_categories(torch.log_softmax(logits, -1), _signal(ids[None], lps[None]), temperature=1.0,
                             topk_tail=True)
    loss = reverse_kl(*pair).sum()
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("pair", ["characters", "identical"])
def test_every_entry_in_any_order_gives_the_dense_record(pair):
    """A server that sends every teacher token, in any order, gets the record of the teacher run here (read
    through the projection's index tables, not per entry; with identical tokenizers the map is one-to-one and the
    top k is taken over the teacher's ids), slot for slot, at aligned positions and inside teacher tokens."""
    teacher = sentencepiece()
    student = build_tokenizer() if pair == "characters" else teacher
    aligner = Aligner(student, teacher, "test")
    assert aligner.projection.one_to_one == (pair == "identical")
    segment = aligner.segment(ids_of(student, "what is the sum"), "row 0")
    assert segment.aligned and any(segment.partials) == (pair == "characters")
    g = torch.Generator().manual_seed(1)
    n = len(segment.student_positions)
    lp = torch.log_softmax(torch.randn(n, len(teacher), generator=g, dtype=torch.float64) * 3, -1)
    actions = torch.randint(-1, len(student), (n,), generator=g)
    order = torch.stack([torch.randperm(len(teacher), generator=g) for _ in range(n)])
    for top_k in (4, len(student) + 5):
        want = project([segment], None, lp, actions, aligner.projection, top_k=top_k)
        got = project([segment], order, lp.gather(-1, order), actions, aligner.projection, top_k=top_k)
        assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], rtol=1e-12, atol=0)


def test_the_students_own_token_is_read_exactly_outside_the_top_k():
    """The slot after the top k holds the student's next token's projected log-prob when it is outside them, so
    td_target teacher_logprob reads it exactly; -inf when it is inside them or there is none."""
    student, teacher = build_tokenizer(), byte_level()
    aligner = Aligner(student, teacher, "test")
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, len(teacher), generator=g, dtype=torch.float64) * 3, -1)
    every = torch.arange(len(teacher)).expand_as(lp)
    three = AlignedSegment([], [0, 1, 2], [0, 1, 2], [b""] * 3, [0] * 3, [0] * 3, [-1] * 3, [0, 1, 2], [b""] * 3)
    full = project([three], every, lp,
                   torch.full((3,), -1), aligner.projection, top_k=len(student))
    ranked = full[0][0][torch.isfinite(full[1][0])]
    outside, best = int(ranked[-1]), int(full[0][2, 0])
    actions = torch.tensor([outside, -1, best])
    ids, lps = project([three], every, lp, actions,
                       aligner.projection, top_k=4)
    assert ids.shape == (3, 5)
    assert torch.equal(ids[:, :4], full[0][:, :4]) and torch.equal(lps[:, :4], full[1][:, :4])
    want = float(full[1][0][full[0][0] == outside][0])
    assert int(ids[0, 4]) == outside and float(lps[0, 4]) == want
    assert math.isinf(float(lps[1, 4])) and math.isinf(float(lps[2, 4]))  # no action / already in the top k
    got = teacher_token_logprob(_signal(ids, lps), actions.clamp(min=0), temperature=1.0, topk_tail=True,
                                vocab_size=len(student))
    assert float(got[0]) == want and float(got[2]) == pytest.approx(float(full[1][2, 0]), rel=1e-12)


def _signal(ids, lps):
    from axolotl_xkd.losses.signal import TopKSignal

    signal = TopKSignal(token_ids=ids, logprobs=lps)
    signal.validate(vocab_size=int(ids.max()) + 1)
    return signal
