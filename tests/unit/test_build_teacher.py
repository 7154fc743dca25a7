"""teachers/build.py: one teacher block, one source, for every kind (model, aligned model, server, aligned server),
with the block's own dtype and attention kernel over the defaults the caller passes."""

from __future__ import annotations

import threading

import pytest
import torch

from axolotl_xkd.args import ModelTeacher, ServerTeacher
from axolotl_xkd.server.app import TeacherScorer, make_server
from axolotl_xkd.server.client import TeacherServerError
from axolotl_xkd.teachers.aligned import AlignedServerTeacherSource, AlignedTeacherSource
from axolotl_xkd.teachers.build import build_teacher
from axolotl_xkd.teachers.model import ModelTeacherSource
from axolotl_xkd.teachers.server import ServerTeacherSource
from axolotl_xkd.tiny import build_model, build_tokenizer
from tests.unit.test_cross_tokenizer import sentencepiece

CPU = {"device": torch.device("cpu"), "attn_implementation": "eager"}


def saved(folder, tokenizer):
    """A tiny teacher of `tokenizer` saved in `folder` (returned as a string)."""
    build_model(tokenizer, hidden=16, layers=1, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_model_block_builds_the_in_process_source_with_its_own_dtype(tmp_path):
    student = build_tokenizer()
    path = saved(tmp_path, student)
    source = build_teacher(ModelTeacher(path=path), student_tokenizer=student, dtype=torch.float32, **CPU)
    assert type(source) is ModelTeacherSource and source.model.dtype == torch.float32
    assert source.model.config._attn_implementation == "eager"
    own = build_teacher(ModelTeacher(path=path, dtype="bfloat16"), student_tokenizer=student, dtype=torch.float32,
                        **CPU)
    assert own.model.dtype == torch.bfloat16


def test_cross_tokenizer_block_builds_the_aligned_source(tmp_path):
    """Across tokenizers the aligned source keeps the block's cross_tokenizer_top_k; without the key, refused."""
    student, teacher = build_tokenizer(), sentencepiece()
    path = saved(tmp_path, teacher)
    with pytest.raises(ValueError, match="differs from the student's"):
        build_teacher(ModelTeacher(path=path), student_tokenizer=student, dtype=torch.float32, **CPU)
    source = build_teacher(ModelTeacher(path=path, cross_tokenizer=True, cross_tokenizer_top_k=5),
                           student_tokenizer=student, dtype=torch.float32, **CPU)
    assert type(source) is AlignedTeacherSource and source.top_k == 5


@pytest.fixture(scope="module")
def served_teacher(tmp_path_factory):
    """`axolotl xkd serve-teacher`'s server of a tiny teacher of the sentencepiece-style tokenizer, and its folder."""
    teacher = sentencepiece()
    folder = saved(tmp_path_factory.mktemp("served"), teacher)
    model = build_model(teacher, hidden=16, layers=1, seed=0).eval()
    server = make_server(TeacherScorer(model, teacher, name="tiny"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


def test_server_block_builds_a_checked_client(served_teacher):
    """A server of another tokenizer: refused as a same-tokenizer teacher, aligned with cross_tokenizer."""
    url, folder = served_teacher
    student = build_tokenizer()
    with pytest.raises(TeacherServerError, match="uses another tokenizer"):
        build_teacher(ServerTeacher(base_url=url, top_k=4), student_tokenizer=student, dtype=torch.float32, **CPU)
    block = ServerTeacher(base_url=url, top_k=4, cross_tokenizer=True, tokenizer_path=folder, cross_tokenizer_top_k=3)
    source = build_teacher(block, student_tokenizer=student, dtype=torch.float32, **CPU)
    assert type(source) is AlignedServerTeacherSource and source.record_k == 3
    source.close()
    same = build_teacher(ServerTeacher(base_url=url, top_k=4), student_tokenizer=sentencepiece(), dtype=torch.float32,
                         **CPU)
    assert type(same) is ServerTeacherSource and same.top_k == 4
    same.close()
