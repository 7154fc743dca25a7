"""The server teacher of another tokenizer (teachers/aligned.py, `AlignedServerTeacherSource`) against
`axolotl xkd serve-teacher`'s server in a thread: with every teacher token sent it gives the in-process aligned
teacher's signal; with a small top k the float64 reference of what the server sent; the config and start-up checks
name the keys."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading

import pytest
import torch
from pydantic import ValidationError

from axolotl_xkd.args import ServerTeacher
from axolotl_xkd.cross_tokenizer import KEY, Aligner
from axolotl_xkd.frozen_teacher import tokenizer_hash
from axolotl_xkd.losses import xkd_loss
from axolotl_xkd.losses.positions import IGNORE_INDEX, shift_targets
from axolotl_xkd.server.app import TeacherScorer, make_server
from axolotl_xkd.server.client import TeacherServerClient, TeacherServerError
from axolotl_xkd.teachers.aligned import AlignedServerTeacherSource, AlignedTeacherSource
from axolotl_xkd.tiny import build_tokenizer
from tests.reference import reference_xkd
from tests.support import spec_params
from tests.unit.test_aligned_teacher import reference_signal, student_batch, teacher_model
from tests.unit.test_cross_tokenizer import byte_level, sentencepiece

FP32 = {"atol": 1e-5, "rtol": 5e-4}  # the server sends float32 log-probs of the float64 teacher


@pytest.fixture(scope="module")
def served():
    """The sentencepiece-style teacher (float64) behind `axolotl xkd serve-teacher`'s server, on loopback."""
    tokenizer = sentencepiece()
    model = teacher_model(tokenizer)
    server = make_server(TeacherScorer(model, tokenizer, name="sp"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield model, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp_tokenizer")
    sentencepiece().save_pretrained(folder)
    return folder


def settings(url: str, tokenizer_path, **overrides) -> ServerTeacher:
    return ServerTeacher(**{"base_url": url, "top_k": len(sentencepiece()), "timeout_s": 5.0, "max_retries": 0,
                            "cross_tokenizer": True, "tokenizer_path": str(tokenizer_path), **overrides})


def server_source(url: str, tokenizer_path, *, record_k: int, **overrides) -> AlignedServerTeacherSource:
    client = TeacherServerClient(settings(url, tokenizer_path, **overrides))
    return AlignedServerTeacherSource.connect(client, student_tokenizer=build_tokenizer(), top_k=record_k)


def dense(signal, vocab_size: int) -> torch.Tensor:
    """A top-k record scattered into (B, T, V) log-probs, -inf outside it."""
    out = torch.full((*signal.logprobs.shape[:-1], vocab_size + 1), -math.inf, dtype=torch.float64)
    ids = torch.where(torch.isfinite(signal.logprobs), signal.token_ids, vocab_size)
    return out.scatter(-1, ids, signal.logprobs.double())[..., :vocab_size]


def packed(batch: dict) -> dict:
    """The batch's rows packed into one (position_ids restart at each sequence)."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    ids = torch.cat([batch["input_ids"][b, :n] for b, n in enumerate(lengths)])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "labels": torch.cat([batch["labels"][b, :n] for b, n in enumerate(lengths)])[None]}


@pytest.mark.parametrize("request_tokens", [8, 8192], ids=["request_per_sequence", "one_request"])
def test_every_teacher_token_sent_gives_the_in_process_signal(served, teacher_folder, request_tokens):
    """k = |V_T|: the records of a packed batch (top 8 mapped tokens and the student's own token) equal the
    in-process aligned teacher's up to float32, and so does the loss with td_target teacher_logprob."""
    model, url = served
    student, teacher = build_tokenizer(), sentencepiece()
    batch = packed(student_batch(student))
    source = server_source(url, teacher_folder, record_k=8, request_tokens=request_tokens)
    signal = source.get_signal(batch)
    local = AlignedTeacherSource(model, Aligner(student, teacher, "test"), top_k=8).get_signal(batch)
    assert signal.token_ids.shape == local.token_ids.shape == (1, batch["input_ids"].shape[1], 9)
    assert torch.equal(torch.isfinite(signal.logprobs), torch.isfinite(local.logprobs))
    torch.testing.assert_close(dense(signal, len(student)), dense(local, len(student)), **FP32)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((*batch["input_ids"].shape, len(student)), generator=g, dtype=torch.float64)
    mu, log_sigma = (torch.randn(batch["input_ids"].shape, generator=g, dtype=torch.float64) for _ in range(2))
    params = spec_params(divergence="forward_kl", td_target="teacher_logprob")
    losses = [xkd_loss(logits, batch["labels"], teacher=s, mu=mu, log_sigma=log_sigma, params=params,
                       eos_token_id=student.eos_token_id, position_ids=batch["position_ids"]).loss
              for s in (signal, local)]
    torch.testing.assert_close(losses[0], losses[1], **FP32)


def test_small_top_k_matches_the_float64_reference_of_what_was_sent(served, teacher_folder):
    """The server sends its top 8 and the prompt's next token: the record holds the 2 most likely of them with a
    student twin, and the student's own token when it was sent (the teacher's next token after the whole text is
    its EOS); the loss equals the float64 reference over those records."""
    model, url = served
    student, teacher = build_tokenizer(), sentencepiece()
    batch = student_batch(student)
    signal = server_source(url, teacher_folder, record_k=2, top_k=8).get_signal(batch)
    reference = reference_signal(student, teacher, model, batch, top_k=2, server_top_k=8)
    got = dense(signal, len(student))
    want = dense(type(signal)(token_ids=reference["ids"], logprobs=reference["logprobs"]), len(student))
    counted = shift_targets(batch["labels"], None) != IGNORE_INDEX  # the loss reads no other position's record
    torch.testing.assert_close(got[counted], want[counted], **FP32)
    assert not torch.isfinite(got[~counted]).any()
    # Some positions read the student's own token from the prompt token's log-prob, outside the record's 2.
    assert int(torch.isfinite(signal.logprobs[..., -1]).sum()) >= 2
    g = torch.Generator().manual_seed(1)
    logits = torch.randn((*batch["input_ids"].shape, len(student)), generator=g, dtype=torch.float64)
    mu, log_sigma = (torch.randn(batch["input_ids"].shape, generator=g, dtype=torch.float64) for _ in range(2))
    params = spec_params(divergence="reverse_kl", td_target="teacher_logprob")
    out = xkd_loss(logits, batch["labels"], teacher=signal, mu=mu, log_sigma=log_sigma, params=params,
                   eos_token_id=student.eos_token_id)
    ref, terms, _ = reference_xkd(logits, batch["labels"], teacher=reference, mu=mu, log_sigma=log_sigma,
                                  hp=dataclasses.asdict(params), eos=student.eos_token_id)
    torch.testing.assert_close(out.loss, ref, **FP32)
    torch.testing.assert_close(out.td_nll, terms["td_nll"], **FP32)


def test_more_student_tokens_kept_than_the_server_sends_fits_the_record(served, teacher_folder):
    """The defaults (64 student tokens kept, 20 teacher tokens sent): the record is as wide as what was sent allows,
    and holds the same distribution as a record of exactly that width."""
    _, url = served
    student = build_tokenizer()
    wide = server_source(url, teacher_folder, record_k=64, top_k=8).get_signal(student_batch(student))
    exact = server_source(url, teacher_folder, record_k=9, top_k=8).get_signal(student_batch(student))
    assert wide.logprobs.shape[-1] == exact.logprobs.shape[-1] == 10
    torch.testing.assert_close(dense(wide, len(student)), dense(exact, len(student)), **FP32)


def test_coverage_and_vocabularies_are_logged(served, teacher_folder, caplog):
    _, url = served
    student = build_tokenizer()
    with caplog.at_level(logging.INFO, logger="axolotl_xkd"):
        source = server_source(url, teacher_folder, record_k=8, top_k=8)
        signal = source.get_signal(student_batch(student))
    labels = student_batch(student)["labels"]
    responses = labels[:, 1:] != -100
    covered = int((torch.isfinite(signal.logprobs).any(-1)[:, :-1] & responses).sum())
    assert f"student vocabulary {len(student)} tokens, teacher {len(sentencepiece())}" in caplog.text
    assert f"coverage after 1 batches: {covered} of {int(responses.sum())} response positions" in caplog.text


def test_cross_tokenizer_needs_the_teachers_tokenizer():
    with pytest.raises(ValidationError, match="xkd.teacher.tokenizer_path is required with xkd.teacher.cross_tok"):
        ServerTeacher(base_url="http://127.0.0.1:8000", cross_tokenizer=True)
    with pytest.raises(ValidationError, match="tokenizer_path='t' .*read only with xkd.teacher.cross_tokenizer"):
        ServerTeacher(base_url="http://127.0.0.1:8000", tokenizer_path="t")


def test_other_tokenizer_refusal_names_the_key(served):
    """Without the key, a server of another tokenizer is refused, and the error names the key that allows it."""
    _, url = served
    student = build_tokenizer()
    client = TeacherServerClient(ServerTeacher(base_url=url, top_k=4, timeout_s=5.0, max_retries=0))
    with pytest.raises(TeacherServerError, match=rf"than the student .*set {KEY}: true with xkd.teacher.tokenizer"):
        client.check_server(student, tokenizer_hash(student))


def test_tokenizer_path_of_another_tokenizer_is_refused(served, tmp_path):
    """xkd.teacher.tokenizer_path must be the served model's: the prompts are its ids."""
    _, url = served
    byte_level().save_pretrained(tmp_path)
    with pytest.raises(TeacherServerError, match=rf"than xkd.teacher.tokenizer_path='{tmp_path}'.*point xkd.teacher"
                                                 r"\.tokenizer_path at the tokenizer the server loaded"):
        server_source(url, tmp_path, record_k=8, top_k=8)
