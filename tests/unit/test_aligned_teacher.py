"""The in-process teacher of another tokenizer (teachers/aligned.py): its signal against the float64 reference of
the alignment (tests/reference.py), the identity case, packing, coverage logging and the opt-in key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math

import pytest
import torch

from axolotl_xkd.cross_tokenizer import KEY, Aligner, project
from axolotl_xkd.losses import DenseSignal, xkd_loss
from axolotl_xkd.losses.categories import TAIL_FLOOR
from axolotl_xkd.losses.positions import IGNORE_INDEX, shift_targets
from axolotl_xkd.losses.signal import DenseHiddenSignal
from axolotl_xkd.teachers.aligned import AlignedTeacherSource
from axolotl_xkd.teachers.model import ModelTeacherSource
from axolotl_xkd.tiny import build_model, build_tokenizer, encode_rows
from tests.reference import aligned_teacher_record, reference_xkd
from tests.support import spec_params
from tests.unit.test_cross_tokenizer import sentencepiece

ROWS = [{"prompt": "what is 3+4=", "response": "7 hello"}, {"prompt": "5-2=", "response": "3"}]


def teacher_model(tokenizer, seed: int = 0):
    return build_model(tokenizer, hidden=32, layers=2, seed=seed).double().eval()


def student_batch(student, rows=ROWS) -> dict[str, torch.Tensor]:
    ids, labels = encode_rows(student, rows)
    return {"input_ids": ids, "attention_mask": (ids != student.pad_token_id).long(), "labels": labels}


def reference_signal(student, teacher, model, batch, *, top_k: int, rows=ROWS, server_top_k: int | None = None) -> dict:
    """The reference's records (with `server_top_k`: of what a server sends) cut to the k most likely entries plus
    the student's next token, scaled to leave TAIL_FLOOR to the tail where they hold more and the tail has student
    tokens, padded into the (ids, logprobs) shape reference_xkd reads."""
    shape = (*batch["input_ids"].shape, top_k + 1)
    token_ids, logprobs = torch.zeros(shape, dtype=torch.long), torch.full(shape, -math.inf, dtype=torch.float64)
    for b, (row, ids) in enumerate(zip(rows, batch["input_ids"].tolist())):
        text = row["prompt"] + row["response"]
        length = len(student(text)["input_ids"]) + 1
        # the student tokenized the prompt and the response apart (encode_rows, as Axolotl): so does the teacher
        teacher_ids = (teacher(row["prompt"])["input_ids"]
                       + teacher(row["response"], add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([teacher_ids])).logits[0]
        records = aligned_teacher_record(student, teacher, logits, text, ids[:length], server_top_k=server_top_k,
                                         parts=[row["prompt"], row["response"]])
        for i, entries in enumerate(records):
            kept = sorted(entries, key=lambda sid: -entries[sid])[:top_k]
            if i + 1 < length and ids[i + 1] in entries and ids[i + 1] not in kept:
                kept.append(ids[i + 1])
            covered = sum(math.exp(entries[sid]) for sid in kept)
            scale = (1.0 - TAIL_FLOOR) / covered if top_k < len(student) and covered > 1.0 - TAIL_FLOOR else 1.0
            for slot, sid in enumerate(kept):
                token_ids[b, i, slot], logprobs[b, i, slot] = sid, entries[sid] + math.log(scale)
    return {"kind": "topk", "ids": token_ids, "logprobs": logprobs}


@pytest.mark.parametrize(
    "params",
    [spec_params(divergence="forward_kl"), spec_params(divergence="jsd", beta=0.5, temperature=1.5),
     spec_params(divergence="reverse_kl", td_target="teacher_logprob"),
     spec_params(divergence="tvd", td_target="teacher_expected", q_form="logprobs")],
    ids=["forward_kl", "jsd", "reverse_kl+teacher_logprob", "tvd+teacher_expected"],
)
def test_aligned_signal_loss_matches_the_float64_reference(params):
    """The loss over the aligned signal equals the float64 reference computed from the spec on distributions
    aligned by the reference (offsets and token strings), for the divergence and the TD targets."""
    student, teacher = build_tokenizer(), sentencepiece()
    model = teacher_model(teacher)
    batch = student_batch(student)
    signal = AlignedTeacherSource(model, Aligner(student, teacher, "test"), top_k=6).get_signal(batch)
    reference = reference_signal(student, teacher, model, batch, top_k=6)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((*batch["input_ids"].shape, len(student)), generator=g, dtype=torch.float64)
    mu, log_sigma = (torch.randn(batch["input_ids"].shape, generator=g, dtype=torch.float64) for _ in range(2))
    out = xkd_loss(logits, batch["labels"], teacher=signal, mu=mu, log_sigma=log_sigma, params=params,
                   eos_token_id=student.eos_token_id)
    ref, terms, count = reference_xkd(logits, batch["labels"], teacher=reference, mu=mu, log_sigma=log_sigma,
                                      hp=dataclasses.asdict(params), eos=student.eos_token_id)
    assert int(out.num_tokens) == count
    torch.testing.assert_close(out.loss, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.td_nll, terms["td_nll"], atol=1e-9, rtol=1e-9)
    covered = torch.isfinite(signal.logprobs).any(-1)
    counted = shift_targets(batch["labels"], None) != IGNORE_INDEX
    assert torch.equal(covered, torch.isfinite(reference["logprobs"]).any(-1) & counted)
    assert torch.equal(covered, counted)  # every position the loss counts reads the teacher, and no other
    segments = [Aligner(student, teacher, "test").segment(row, "row") for row in batch["input_ids"].tolist()]
    assert all(s.aligned and any(s.partials) for s in segments)  # some where both tokenizers cut, some inside


def test_identical_tokenizers_reproduce_the_same_tokenizer_signal():
    """Aligning a teacher with itself gives, at every position, its full distribution: the loss equals the loss
    over the same-tokenizer (dense) signal."""
    tokenizer = sentencepiece()
    model = teacher_model(tokenizer)
    batch = student_batch(tokenizer)
    aligned = AlignedTeacherSource(model, Aligner(tokenizer, tokenizer, "test"), top_k=len(tokenizer))
    signal = aligned.get_signal({k: v for k, v in batch.items() if k != "labels"})  # without labels: every position
    dense = ModelTeacherSource(model, len(tokenizer)).get_signal(batch)
    lengths = batch["attention_mask"].sum(-1).tolist()
    for b, length in enumerate(lengths):  # every position with an action (the last one, EOS, has none)
        want = torch.log_softmax(dense.logits[b, : length - 1], -1)
        got = torch.full_like(want, -math.inf).scatter(-1, signal.token_ids[b, : length - 1, :-1],
                                                       signal.logprobs[b, : length - 1, :-1])
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn((*batch["input_ids"].shape, len(tokenizer)), generator=g, dtype=torch.float64)
    params = spec_params(divergence="jsd", beta=0.3, td_weight=0.0, reward_kl_weight=0.0)
    losses = [xkd_loss(logits, batch["labels"], teacher=t, mu=None, log_sigma=None, params=params).loss
              for t in (signal, DenseSignal(dense.logits))]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-12, rtol=1e-12)


def test_log_probs_formed_a_block_at_a_time_equal_the_whole_tensor():
    """The in-process teacher's log-probs formed from its hidden states a block of rows at a time (`DenseHiddenSignal`,
    one row per block here) give the records of the (P, V_T) tensor of its own logits (the path of an output layer
    that is not a plain Linear), and get_signal takes the first path for a Linear head."""
    student, teacher = build_tokenizer(), sentencepiece()
    model = teacher_model(teacher)
    source = AlignedTeacherSource(model, Aligner(student, teacher, "test"), top_k=6)
    assert source.fused
    rows = student_batch(student)["input_ids"].tolist()
    segments = [source.aligner.segment(row, f"row {b}") for b, row in enumerate(rows)]
    seg_of = torch.tensor([n for n, s in enumerate(segments) for _ in s.teacher_positions])
    t_pos = torch.tensor([j for s in segments for j in s.teacher_positions])
    actions = torch.tensor([rows[n][i + 1] if i + 1 < len(rows[n]) else -1
                            for n, s in enumerate(segments) for i in s.student_positions])
    blocks = source._teacher_logprobs([s.teacher_ids for s in segments], seg_of, t_pos)
    assert isinstance(blocks, DenseHiddenSignal)
    source.fused = False
    whole = source._teacher_logprobs([s.teacher_ids for s in segments], seg_of, t_pos)
    assert isinstance(whole, torch.Tensor) and whole.shape == (*blocks.positions, blocks.vocab_size)
    size = source.aligner.vocab.teacher_size
    got = project(segments, None, blocks, actions, source.aligner.projection, top_k=6, chunk_elements=size)
    want = project(segments, None, whole, actions, source.aligner.projection, top_k=6)
    finite = torch.isfinite(want[1])
    assert torch.equal(finite, torch.isfinite(got[1])) and torch.equal(got[0][finite], want[0][finite])
    torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=0)


def test_packed_rows_align_each_sequence_on_its_own():
    """Sample packing: a row holding both sequences (position_ids restart) gets the signals of the two rows."""
    student, teacher = build_tokenizer(), sentencepiece()
    source = AlignedTeacherSource(teacher_model(teacher), Aligner(student, teacher, "test"), top_k=8)
    batch = student_batch(student)
    lengths = batch["attention_mask"].sum(-1).tolist()
    packed_ids = torch.cat([batch["input_ids"][b, :n] for b, n in enumerate(lengths)])[None]
    packed = {"input_ids": packed_ids, "attention_mask": torch.ones_like(packed_ids),
              "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
              "labels": torch.cat([batch["labels"][b, :n] for b, n in enumerate(lengths)])[None]}
    alone, together = source.get_signal(batch), source.get_signal(packed)
    for b, (start, n) in enumerate(zip([0, lengths[0]], lengths)):
        torch.testing.assert_close(together.logprobs[0, start: start + n], alone.logprobs[b, :n])
        finite = torch.isfinite(alone.logprobs[b, :n])
        assert torch.equal(together.token_ids[0, start: start + n][finite], alone.token_ids[b, :n][finite])


def test_coverage_is_logged(caplog):
    student, teacher = build_tokenizer(), sentencepiece()
    source = AlignedTeacherSource(teacher_model(teacher), Aligner(student, teacher, "test"), top_k=8)
    with caplog.at_level(logging.INFO, logger="axolotl_xkd"):
        signal = source.get_signal(student_batch(student))
    responses = int((student_batch(student)["labels"][:, 1:] != -100).sum())
    covered = int((torch.isfinite(signal.logprobs).any(-1)[:, :-1] & (student_batch(student)["labels"][:, 1:] != -100))
                  .sum())
    assert f"coverage after 1 batches: {covered} of {responses} response positions" in caplog.text


def test_other_tokenizer_needs_the_key(tmp_path, caplog):
    """Without the key, today's refusal, now naming it; with it, the teacher loads and the vocabularies are logged."""
    student, teacher = build_tokenizer(), sentencepiece()
    build_model(teacher, hidden=32, layers=2, seed=0).save_pretrained(tmp_path)
    teacher.save_pretrained(tmp_path)
    kwargs = {"student_tokenizer": student, "dtype": torch.float32, "device": torch.device("cpu")}
    with pytest.raises(ValueError, match=f"differs from the student's.*{KEY}: true"):
        ModelTeacherSource.load(str(tmp_path), **kwargs)
    with caplog.at_level(logging.INFO, logger="axolotl_xkd"):
        source = AlignedTeacherSource.load(str(tmp_path), top_k=8, **kwargs)
    exact = source.aligner.vocab.exact
    assert f"student vocabulary {len(student)} tokens, teacher {len(teacher)}; {exact} teacher tokens" in caplog.text
    assert not source.fusable


def test_store_built_for_another_pair_is_refused(tmp_path):
    """A cross-tokenizer store names its teacher's tokenizer and the map's digest; with xkd.teacher.model_path set,
    training refuses it for another teacher tokenizer and accepts it for its own."""
    from axolotl_xkd.args import PrecomputedTeacher
    from axolotl_xkd.frozen_teacher import tokenizer_hash
    from axolotl_xkd.store.format import Manifest
    from axolotl_xkd.store.read import check_teacher_pair
    from tests.unit.test_cross_tokenizer import byte_level

    student, teacher = build_tokenizer(), sentencepiece()
    for name, tokenizer in (("own", teacher), ("other", byte_level())):
        tokenizer.save_pretrained(tmp_path / name)
    manifest = Manifest(teacher="t", tokenizer_hash=tokenizer_hash(student), vocab_size=len(student), top_k=9,
                        sequence_len=32, encoding="packed_u32", logprob_dtype="float16", rows_per_shard=8,
                        teacher_tokenizer_hash=tokenizer_hash(teacher),
                        vocab_map=Aligner(student, teacher, "test").vocab.digest())
    check_teacher_pair(manifest, PrecomputedTeacher(path=str(tmp_path), model_path=str(tmp_path / "own"), cross_tokenizer=True), student)
    with pytest.raises(ValueError, match=r"manifest.json: teacher_tokenizer_hash / vocab_map .*another"):
        check_teacher_pair(manifest, PrecomputedTeacher(path=str(tmp_path), model_path=str(tmp_path / "other"), cross_tokenizer=True),
                           student)
    # a store of the exact-map rule (before the prefix projection): its digest had no rule in it
    vocab = Aligner(student, teacher, "test").vocab
    earlier = hashlib.sha256(json.dumps({"student_size": vocab.student_size,
                                         "map": vocab.student_ids.tolist()}).encode()).hexdigest()
    with pytest.raises(ValueError, match=r"or by an earlier alignment rule"):
        check_teacher_pair(dataclasses.replace(manifest, vocab_map=earlier),
                           PrecomputedTeacher(path=str(tmp_path), model_path=str(tmp_path / "own"), cross_tokenizer=True),
                           student)
    # the config must say the teacher has another tokenizer, and a same-tokenizer store must not claim it
    with pytest.raises(ValueError, match=r"aligned from a teacher of another tokenizer.*cross_tokenizer: false"):
        check_teacher_pair(manifest, PrecomputedTeacher(path=str(tmp_path)), student)
    with pytest.raises(ValueError, match=r"made with the student's tokenizer.*cross_tokenizer: true"):
        check_teacher_pair(dataclasses.replace(manifest, vocab_map=None, teacher_tokenizer_hash=None),
                           PrecomputedTeacher(path=str(tmp_path), cross_tokenizer=True), student)
