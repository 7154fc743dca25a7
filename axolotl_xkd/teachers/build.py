"""The one builder of a teacher source from a validated teacher block: an in-process model (`source: model`) or a
teacher server (`source: server`), each of the student's tokenizer or, with `cross_tokenizer`, of another one.

Training (`wiring.load_teacher`), `axolotl xkd precompute` and a mixture of teachers build their sources here, so a
teacher block means one thing everywhere. Imports the teacher sources lazily (a server teacher needs no
transformers model); nothing of the trainer, the wiring or the plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from axolotl_xkd.losses.precision import torch_dtype
from axolotl_xkd.teachers.base import TeacherSource

if TYPE_CHECKING:
    from axolotl_xkd.args import ModelTeacher, ServerTeacher


def build_teacher(block: ModelTeacher | ServerTeacher, *, student_tokenizer, dtype: torch.dtype,
                  device: torch.device | str, attn_implementation: str | None = None,
                  ds_config: dict | None = None) -> TeacherSource:
    """The teacher source of `block`, checked against `student_tokenizer` (its ids must match unless
    `block.cross_tokenizer`; across tokenizers, the two are aligned and the records hold `cross_tokenizer_top_k`
    student tokens).

    For an in-process teacher, `dtype` and `attn_implementation` are the defaults the block's own `dtype` and
    `attn_implementation` override (training passes the student's), `device` where it is placed and `ds_config`
    the student's DeepSpeed config (None without DeepSpeed; ZeRO-3 shards the teacher). A server teacher reads
    none of them.
    """
    if block.source == "server":
        return load_server_teacher(block, student_tokenizer)
    if block.source != "model":
        raise ValueError(f"xkd.teacher (source={block.source!r}) is not a teacher to run: build_teacher takes a "
                         "`source: model` or `source: server` block")
    options = {
        "student_tokenizer": student_tokenizer,
        "dtype": torch_dtype(block.dtype) if block.dtype else dtype,
        "device": device,
        "tokenizer_path": block.tokenizer_path,
        "attn_implementation": block.attn_implementation or attn_implementation,
        "trust_remote_code": block.trust_remote_code,
        "ds_config": ds_config,
        "offload": block.offload,
    }
    if block.cross_tokenizer:
        from axolotl_xkd.teachers.aligned import AlignedTeacherSource

        return AlignedTeacherSource.load(block.path, top_k=block.cross_tokenizer_top_k, **options)
    from axolotl_xkd.teachers.model import ModelTeacherSource

    return ModelTeacherSource.load(block.path, **options)


def load_server_teacher(block: ServerTeacher, student_tokenizer) -> TeacherSource:
    """A teacher server client for `block` (source: server), checked once against the student's tokenizer, or
    with cross_tokenizer against the teacher's (xkd.teacher.tokenizer_path), which is aligned with the student's."""
    from axolotl_xkd.frozen_teacher import tokenizer_hash
    from axolotl_xkd.server.client import TeacherServerClient, api_key_from_env
    from axolotl_xkd.teachers.server import ServerTeacherSource

    client = TeacherServerClient(block, api_key=api_key_from_env(block))
    if block.cross_tokenizer:
        from axolotl_xkd.teachers.aligned import AlignedServerTeacherSource

        return AlignedServerTeacherSource.connect(client, student_tokenizer=student_tokenizer,
                                                  top_k=block.cross_tokenizer_top_k)
    client.check_server(student_tokenizer, tokenizer_hash(student_tokenizer))
    return ServerTeacherSource(client)
