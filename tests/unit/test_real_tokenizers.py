"""Distillation across the real tokenizers of the big families (Llama 3 and Qwen3 byte-level, Qwen3 with its NFC
normalizer, Gemma 3 and Llama 2 sentencepiece-style with byte fallback, Llama 2 with a dummy prefix), fetched once
into a cache (benchmarks/real_tokenizers.py), on rows of real text: accents precomposed and decomposed, CJK, emoji
with ZWJ sequences and flags, code with tabs and runs of spaces, CRLF, right-to-left scripts, long digit runs, URLs,
JSON, Markdown tables, Alpaca prompts and conversations in the student family's own chat template.

The invariant that would have caught wrong targets: a teacher certain of the text (all its mass on its own next
token at every position) projects all the mass onto the student's own next token at every student position that
gets a record, the first response token and the end of text included."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from axolotl_xkd.cross_tokenizer import Aligner, path_rows, project
from axolotl_xkd.losses.categories import TAIL_FLOOR
from benchmarks.real_tokenizers import ALPACA, ANSWER, TEXTS, load

# (student, teacher): every family on each side, the two conventions crossed both ways, and two identical pairs
PAIRS = [("llama3", "gemma3"), ("qwen3", "llama2"), ("gemma3", "qwen3"), ("llama2", "llama3"), ("llama3", "qwen3"),
         ("qwen3", "qwen3"), ("llama2", "llama2")]


@cache
def aligner(student: str, teacher: str) -> Aligner:
    return Aligner(load(student), load(teacher), f"{teacher} teacher for a {student} student")


def student_row(tokenizer, text: str) -> list[int]:
    """The student's sequence as Axolotl builds it: its own leading specials, the text, its EOS."""
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def chat_row(tokenizer) -> tuple[list[int], int]:
    """A conversation in the student family's own chat template (Axolotl's chat_template type renders it so), and
    the index of the first answer token."""
    messages = [{"role": "user", "content": "Reverse: slate ivory coral\n\tplease 👍🏽"},
                {"role": "assistant", "content": ANSWER + " — ok."}]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(prompt)] == prompt
    return list(full), len(prompt)


def certain_teacher_records(al: Aligner, ids: list[int], parts: list[int] = ()):
    """Project a teacher that is certain of its own re-tokenization of the row (its `parts` tokenized apart);
    -> (segment, ids, log-probs)."""
    segment = al.segment(ids, "row 0", list(parts))
    teacher_ids, eos = segment.teacher_ids, al.teacher.eos_token_id
    rows = [*segment.teacher_positions, *(l for _, l in path_rows([segment]))]
    lp = torch.full((len(rows), al.vocab.teacher_size), -math.inf, dtype=torch.float64)
    for n, j in enumerate(rows):
        lp[n, teacher_ids[j + 1] if j + 1 < len(teacher_ids) else eos] = 0.0
    actions = torch.tensor([ids[i + 1] if i + 1 < len(ids) else -1 for i in segment.student_positions])
    out_ids, out_lps = project([segment], None, lp, actions, al.projection, top_k=8)
    return segment, out_ids, out_lps


def own_mass(ids: list[int], segment, out_ids: torch.Tensor, out_lps: torch.Tensor) -> dict[int, float]:
    """Student position -> the probability its record gives the student's own next token."""
    return {i: float(out_lps[n][(out_ids[n] == ids[i + 1]) & torch.isfinite(out_lps[n])].exp().sum())
            for n, i in enumerate(segment.student_positions) if i + 1 < len(ids)}


@pytest.mark.parametrize(("student", "teacher"), PAIRS, ids=[f"{t}_into_{s}" for s, t in PAIRS])
def test_a_certain_teacher_puts_all_the_mass_on_the_students_own_token(student, teacher):
    al = aligner(student, teacher)
    tokenizer = al_student = load(student)
    rows = {name: (student_row(tokenizer, text), None) for name, text in TEXTS.items()}
    prompt = tokenizer(ALPACA)["input_ids"]
    rows["alpaca"] = (student_row(tokenizer, ALPACA + ANSWER), len(prompt))
    if al_student.chat_template:
        rows["chat"] = chat_row(tokenizer)
    for name, (ids, first_answer) in rows.items():
        segment, out_ids, out_lps = certain_teacher_records(al, ids)
        mass = own_mass(ids, segment, out_ids, out_lps)
        wrong = {i: m for i, m in mass.items() if m < 1 - TAIL_FLOOR - 1e-9}
        assert not wrong, (name, {i: tokenizer.convert_ids_to_tokens(ids[i + 1]) for i in wrong})
        assert len(ids) - 2 in mass, name  # the position that predicts the end of text has a record
        if first_answer is not None:  # and so has the one that predicts the first response token
            assert first_answer - 1 in mass, (name, tokenizer.convert_ids_to_tokens(ids[first_answer]))
        if name not in ("accents", "chat") or teacher != "qwen3":  # only Qwen3's NFC changes these texts
            assert len(mass) >= len(ids) - 4, (name, len(mass), len(ids))


@pytest.mark.parametrize(("student", "teacher"), [("llama3", "llama2"), ("llama2", "llama3"), ("gemma3", "llama2"),
                                                 ("llama2", "qwen3")], ids=lambda name: name)
def test_a_response_tokenized_apart_is_aligned_from_its_first_token(student, teacher):
    """Axolotl's instruction strategies tokenize the prompt and the response apart (a sentencepiece-style student's
    response then opens with its dummy-prefix space); the teacher re-tokenizes the two parts apart too, as it reads
    a response it generates after its prompt. A certain teacher then points at the student's own token at every
    response position, the first included, and never at a space the text does not have."""
    al = aligner(student, teacher)
    tokenizer = load(student)
    for text in TEXTS.values():
        prompt = tokenizer(ALPACA.replace("slate ivory coral", text))["input_ids"]
        ids = prompt + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        segment, out_ids, out_lps = certain_teacher_records(al, ids, [len(prompt)])
        mass = own_mass(ids, segment, out_ids, out_lps)
        response = range(len(prompt) - 1, len(ids) - 1)
        assert set(response) <= set(mass) or teacher == "qwen3", (text, sorted(set(response) - set(mass)))
        assert len(prompt) - 1 in mass, text  # the first response token
        wrong = {i: m for i, m in mass.items() if m < 1 - TAIL_FLOOR - 1e-9}
        assert not wrong, (text, {i: tokenizer.convert_ids_to_tokens(ids[i + 1]) for i in wrong})


@pytest.mark.parametrize("family", ["qwen3", "llama2"])
def test_an_identical_real_pair_gives_the_same_tokenizer_record_exactly(family):
    """Identical tokenizers: every position aligned with itself, each token its own twin, and the record the top k
    of the teacher's distribution with the student's own token beside it, bit for bit."""
    al = aligner(family, family)
    tokenizer = load(family)
    assert torch.equal(al.vocab.student_ids, torch.arange(len(tokenizer)))
    ids = student_row(tokenizer, ALPACA + ANSWER + " " + TEXTS["emoji"] + TEXTS["code"])
    segment = al.segment(ids, "row 0")
    assert segment.student_positions == list(range(len(ids)))
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(len(ids), len(tokenizer), generator=g) * 4, -1)
    actions = torch.tensor([*ids[1:], -1])
    out_ids, out_lps = project([segment], None, lp[segment.teacher_positions], actions, al.projection, top_k=8)
    top = lp[segment.teacher_positions].topk(8, dim=-1)
    assert torch.equal(out_ids[:, :8], top.indices) and torch.equal(out_lps[:, :8], top.values)
    outside = ~(top.indices == actions[:, None]).any(-1) & (actions >= 0)
    own = lp[segment.teacher_positions].gather(-1, actions.clamp(min=0)[:, None]).squeeze(-1)
    assert torch.equal(out_lps[outside, 8], own[outside])


def test_gemma_runs_of_spaces_are_text():
    """Gemma 3 lists `▁▁` (two spaces) as a non-special added token: it is read through the decoder as two spaces,
    so code with runs of spaces aligns at every position."""
    al = aligner("llama3", "gemma3")
    ids = student_row(load("llama3"), TEXTS["code"])
    segment = al.segment(ids, "row 0")
    assert al.respelled == 0
    assert segment.student_positions == list(range(len(ids)))


def test_a_normalizer_that_changes_the_text_leaves_only_its_span_out(caplog):
    """Qwen3 normalises to NFC: decomposed accents are spelled precomposed by the teacher. The positions that touch
    those characters get no record (counted in the coverage), the rest of the row aligns, and the row is logged."""
    student = load("llama3")
    al = Aligner(student, load("qwen3"), "qwen3 teacher")
    text = "The Cafe\u0301 is open; the cafe is too."
    ids = student_row(student, text)
    with caplog.at_level("WARNING", logger="axolotl_xkd"):
        segment, out_ids, out_lps = certain_teacher_records(al, ids)
    assert "row 0" in caplog.text and "spells the text otherwise" in caplog.text
    changed = text.encode().index("e\u0301".encode())
    lost = [i for i in range(len(ids) - 1) if i not in segment.student_positions]
    ends = [len(student.decode(ids[1: i + 1]).encode()) for i in range(len(ids))]
    assert lost and all(changed - 8 <= ends[i] <= changed + 3 for i in lost), (lost, ends)
    assert all(m >= 1 - TAIL_FLOOR - 1e-9 for m in own_mass(ids, segment, out_ids, out_lps).values())


@cache
def no_newline_teacher() -> PreTrainedTokenizerFast:
    """A sentencepiece-style tokenizer without byte fallback whose vocabulary has no newline (T5's kind): it writes
    `\\n` as its UNK."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    corpus = [ALPACA.replace("\n", " ") + ANSWER] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


def test_a_teacher_that_cannot_spell_a_newline_does_not_stop_the_run():
    """An Alpaca row's line breaks become the teacher's UNK (zero width): the positions that predict or follow a
    line break get no record, every other position aligns, and a certain teacher still points at the student's
    own token there; the answer's positions, the end of text included, are covered."""
    student = load("llama3")
    al = Aligner(student, no_newline_teacher(), "no-newline teacher")
    ids = student_row(student, ALPACA + ANSWER)
    segment, out_ids, out_lps = certain_teacher_records(al, ids)
    mass = own_mass(ids, segment, out_ids, out_lps)
    assert all(m >= 1 - TAIL_FLOOR - 1e-9 for m in mass.values())
    newline = [i for i in range(len(ids) - 1) if "\n" in student.decode([ids[i + 1]])]
    assert newline and not set(newline) & set(mass)
    answer = len(student(ALPACA)["input_ids"])
    assert set(range(answer, len(ids) - 1)) <= set(mass)
    assert len(mass) >= (len(ids) - 1) - 2 * len(newline) - 2
