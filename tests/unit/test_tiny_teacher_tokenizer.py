"""`python -m axolotl_xkd.tiny --teacher-tokenizer byte_level`: a teacher of another tokenizer than the student's,
saved as a usual teacher folder (docs/cross_tokenizer.md, "Try it on the CPU")."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_xkd.tiny import build_all


def test_byte_level_teacher_folder_loads_with_its_own_tokenizer(tmp_path):
    paths = build_all(tmp_path, teacher_steps=2, train_rows=64, teacher_tokenizer="byte_level", teacher_vocab_size=300)
    spec = json.loads((paths["teacher"] / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["pre_tokenizer"]["type"] == "ByteLevel"
    teacher_words = AutoTokenizer.from_pretrained(paths["teacher"])
    student_words = AutoTokenizer.from_pretrained(paths["student"])
    assert teacher_words.get_vocab() != student_words.get_vocab()
    assert len(teacher_words) >= 256 + 4  # every byte and the 4 specials
    assert teacher_words.decode(teacher_words("7+8=15")["input_ids"]) == "7+8=15"
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    assert teacher.config.vocab_size == len(teacher_words)
    assert AutoModelForCausalLM.from_pretrained(paths["student"]).config.vocab_size == len(student_words)
    # The student side is unchanged: the shared tokenizer folder is the student's character tokenizer.
    assert AutoTokenizer.from_pretrained(paths["tokenizer"]).get_vocab() == student_words.get_vocab()


def test_unknown_teacher_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="byte_level"):
        build_all(tmp_path, teacher_steps=1, train_rows=8, teacher_tokenizer="wordpiece")
