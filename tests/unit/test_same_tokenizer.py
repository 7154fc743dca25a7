"""The same-tokenizer rule (frozen_teacher) is one rule: the in-process model source, a precomputed store and a
teacher server accept and refuse the same teachers, and warn alike on other special-token designations.

Regression: the store's fingerprint included pad_token_id and the model source only warned on other BOS/EOS/UNK,
so a store or a server refused a teacher the model source accepted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from axolotl_xkd.args import ServerTeacher
from axolotl_xkd.frozen_teacher import special_tokens, tokenizer_hash
from axolotl_xkd.server.app import TeacherScorer, make_server
from axolotl_xkd.server.client import TeacherServerClient, TeacherServerError
from axolotl_xkd.store.format import Manifest
from axolotl_xkd.store.read import check_manifest
from axolotl_xkd.teachers.model import ModelTeacherSource
from axolotl_xkd.tiny import CHARACTERS, SPECIALS, build_model, build_tokenizer


def other_pad() -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.pad_token = "</s>"
    return tokenizer


def other_eos() -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "."
    return tokenizer


def extra_token() -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    return tokenizer


def swapped_ids() -> PreTrainedTokenizerFast:
    """The student's tokens and specials, with the ids of '0' and '1' swapped: same size, same tokens."""
    order = [*SPECIALS, *CHARACTERS]
    a, b = order.index("0"), order.index("1")
    order[a], order[b] = order[b], order[a]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(order)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


# teacher tokenizer -> (accepted, warned): the rule's verdict, the same for every source.
CASES: dict[str, tuple[Callable[[], PreTrainedTokenizerFast], bool, bool]] = {
    "same": (build_tokenizer, True, False),
    "other_pad": (other_pad, True, True),
    "other_eos": (other_eos, True, True),
    "extra_token": (extra_token, False, False),
    "swapped_ids": (swapped_ids, False, False),
}


def model_source(student, teacher, tmp_path) -> None:
    folder = tmp_path / "teacher"
    build_model(teacher, hidden=16, layers=1, seed=0).save_pretrained(folder)
    teacher.save_pretrained(folder)
    ModelTeacherSource.load(str(folder), student_tokenizer=student, dtype=torch.float32, device=torch.device("cpu"))


def store_source(student, teacher, tmp_path) -> None:
    """A store whose rows were made with `teacher`'s tokenizer, checked by training with `student`'s."""
    manifest = Manifest(teacher="t", tokenizer_hash=tokenizer_hash(teacher), vocab_size=len(teacher),
                        special_tokens=special_tokens(teacher), top_k=4, sequence_len=32, encoding="packed_u32",
                        logprob_dtype="float16", rows_per_shard=8, splits={"train": 8})
    check_manifest(manifest, str(tmp_path), tokenizer=student, sequence_len=32, top_k=4)


def server_source(student, teacher, tmp_path) -> None:
    """`axolotl xkd serve-teacher`'s server serving `teacher`, checked by the client of a `student` run."""
    server = make_server(TeacherScorer(build_model(teacher, hidden=16, layers=1, seed=0), teacher, name="t"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = TeacherServerClient(ServerTeacher(base_url=f"http://127.0.0.1:{server.server_address[1]}",
                                                    top_k=4, timeout_s=5.0, max_retries=0))
        try:
            client.check_server(student, tokenizer_hash(student))
        finally:
            client.close()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("source", [model_source, store_source, server_source], ids=["model", "store", "server"])
def test_every_source_applies_the_same_rule(case, source, tmp_path, caplog):
    make_teacher, accepted, warned = CASES[case]
    student = build_tokenizer()
    with caplog.at_level(logging.WARNING, logger="axolotl_xkd"):
        if accepted:
            source(student, make_teacher(), tmp_path)
        else:
            with pytest.raises((ValueError, TeacherServerError)):
                source(student, make_teacher(), tmp_path)
    assert ("for the student but" in caplog.text) == warned, caplog.text
