"""The precomputed-teacher store: encoding, row validation, manifest checks, collators, KD v2 alignment."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from axolotl_xkd.frozen_teacher import tokenizer_hash
from axolotl_xkd.keys import TEACHER_IDS, TEACHER_LOGPROBS, TOPK_IDS, TOPK_LOGPROBS, TOPK_PACKED
from axolotl_xkd.losses.categories import paired_categories
from axolotl_xkd.losses.divergence import forward_kl
from axolotl_xkd.losses.signal import TopKSignal
from axolotl_xkd.store.collate import TopKDataCollator, TopKV2BatchSamplerCollator
from axolotl_xkd.store.format import Manifest, RowError, decode, encode, response_mask, validate_rows
from axolotl_xkd.store.read import load_split
from axolotl_xkd.store.write import write_shard
from axolotl_xkd.teachers.precomputed import PrecomputedTeacherSource
from axolotl_xkd.tiny import build_tokenizer

V, K = 79, 4


def make_row(rng: np.random.Generator, length: int, prompt: int, *, encoding: str = "packed_u32") -> dict:
    """A row with random tokens, a masked prompt and a valid top-k at every response position."""
    input_ids = rng.integers(4, V, size=length)
    labels = np.where(np.arange(length) < prompt, -100, input_ids)
    r = int(response_mask(labels).sum())
    logits = torch.from_numpy(rng.normal(size=(r, V))).float()
    values, ids = torch.log_softmax(logits, -1).topk(K, -1)
    row = {"input_ids": input_ids.tolist(), "labels": labels.tolist()}
    row.update({k: v.tolist() for k, v in encode(ids.numpy(), values.numpy(), encoding, "float16").items()})
    return row


def table(rows: list[dict]) -> pa.Table:
    types = {TOPK_PACKED: pa.uint32(), TOPK_IDS: pa.int64(), TOPK_LOGPROBS: pa.float32()}
    return pa.table({name: pa.array([r[name] for r in rows], type=pa.list_(types.get(name, pa.int32())))
                     for name in rows[0]})


@pytest.mark.parametrize("encoding", ["packed_u32", "split"])
def test_encode_decode_round_trip_is_float16_exact(encoding):
    rng = np.random.default_rng(0)
    logprobs = np.sort(-rng.exponential(3.0, size=(5, K)).astype(np.float32), axis=-1)[:, ::-1]
    logprobs[0, 0] = 0.0
    ids = rng.integers(0, 131072 if encoding == "packed_u32" else 200000, size=(5, K))
    got_ids, got_logprobs = decode(encode(ids, logprobs, encoding, "float16"), K)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_logprobs, logprobs.astype(np.float16).astype(np.float32))


def test_packed_entry_is_four_bytes():
    values = encode(np.zeros((3, K), np.int64), np.full((3, K), -1.0, np.float32), "packed_u32", "float16")
    assert values[TOPK_PACKED].dtype == np.uint32 and values[TOPK_PACKED].nbytes == 3 * K * 4


def test_valid_rows_pass():
    rng = np.random.default_rng(1)
    rows = [make_row(rng, 10, 6), make_row(rng, 7, 3), make_row(rng, 5, 5)]  # the last has no response
    validate_rows(table(rows), top_k=K, vocab_size=V)
    validate_rows(table([make_row(rng, 9, 2, encoding="split")]), top_k=K, vocab_size=V)


def bad_rows(case: str) -> list[dict]:
    rng = np.random.default_rng(2)
    rows = [make_row(rng, 10, 6, encoding="split") for _ in range(3)]
    bad = rows[2]
    if case == "length":
        bad[TOPK_IDS], bad[TOPK_LOGPROBS] = bad[TOPK_IDS][:-K], bad[TOPK_LOGPROBS][:-K]
    elif case == "nan":
        bad[TOPK_LOGPROBS][K + 1] = float("nan")
    elif case == "posinf":
        bad[TOPK_LOGPROBS][0] = float("inf")
    elif case == "vocab":
        bad[TOPK_IDS][2] = V
    elif case == "mass":
        bad[TOPK_LOGPROBS][:K] = [math.log(0.5)] * K
    return rows


@pytest.mark.parametrize(
    ("case", "field", "words"),
    [
        ("length", TOPK_LOGPROBS, "response positions"),
        ("nan", TOPK_LOGPROBS, "NaN"),
        ("posinf", TOPK_LOGPROBS, r"\+inf"),
        ("vocab", TOPK_IDS, "outside the vocabulary"),
        ("mass", TOPK_LOGPROBS, "summing above 1"),
    ],
)
def test_each_bad_row_names_row_and_field(case, field, words):
    with pytest.raises(RowError, match=words) as error:
        validate_rows(table(bad_rows(case)), top_k=K, vocab_size=V, first_row=100)
    assert "row 102" in str(error.value) and repr(field) in str(error.value)


def test_packed_nan_and_sum_are_caught():
    rng = np.random.default_rng(3)
    rows = [make_row(rng, 10, 6)]
    nan_bits = np.uint32(0x7E00) << np.uint32(17)
    rows[0][TOPK_PACKED][1] = int(nan_bits | np.uint32(5))
    with pytest.raises(RowError, match=f"row 0, field '{TOPK_PACKED}': a NaN"):
        validate_rows(table(rows), top_k=K, vocab_size=V)


def test_float16_rounding_of_a_full_distribution_is_tolerated():
    rng = np.random.default_rng(4)
    logprobs = torch.log_softmax(torch.from_numpy(rng.normal(size=(6, V)) * 0.1).float(), -1)
    values, ids = logprobs.topk(V, -1)
    labels = [-100] + [5] * 6
    encoded = encode(ids.numpy(), values.numpy(), "packed_u32", "float16")
    row = {"input_ids": [5] * 7, "labels": labels, **{k: v.tolist() for k, v in encoded.items()}}
    validate_rows(table([row]), top_k=V, vocab_size=V)


def store_with(tmp_path, rows: list[dict]) -> tuple:
    from datasets import Dataset

    manifest = Manifest(teacher="t", tokenizer_hash="h", vocab_size=V, top_k=K, sequence_len=32,
                        encoding="split", logprob_dtype="float32", rows_per_shard=2, splits={"train": len(rows)})
    manifest.write(tmp_path)
    for index in range(manifest.shards("train")):
        write_shard(Dataset(table(rows[2 * index: 2 * index + 2])), tmp_path, "train", index)
    return manifest, tmp_path


def test_loading_a_bad_store_names_shard_row_and_field(tmp_path):
    manifest, folder = store_with(tmp_path, bad_rows("nan"))
    with pytest.raises(RowError, match="shard-00001: row 2, field 'xkd_topk_logprobs': a NaN"):
        load_split(folder, manifest, "train")


def test_loading_an_unfinished_store_says_to_rerun(tmp_path):
    rng = np.random.default_rng(5)
    manifest, folder = store_with(tmp_path, [make_row(rng, 8, 3, encoding="split") for _ in range(4)])
    assert len(load_split(folder, manifest, "train")) == 4
    (folder / "train" / "shard-00001" / "state.json").unlink()
    (folder / "train" / "shard-00001").rename(folder / "train" / ".tmp-shard-00001")
    with pytest.raises(FileNotFoundError, match="shard-00001 is missing.*resumes"):
        load_split(folder, manifest, "train")


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    tok.padding_side = "right"
    return tok


def manifest_for(tokenizer, **changes) -> Manifest:
    fields = dict(teacher="t", tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=len(tokenizer), top_k=K,
                  sequence_len=32, encoding="packed_u32", logprob_dtype="float16", rows_per_shard=8,
                  splits={"train": 8})
    return Manifest(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "top_k", "field"),
    [({"tokenizer_hash": "0" * 64}, None, "tokenizer_hash"), ({"sequence_len": 64}, None, "sequence_len"),
     ({}, K + 1, "top_k")],
)
def test_manifest_mismatch_names_file_and_field(tokenizer, tmp_path, changes, top_k, field):
    from axolotl_xkd.store.read import check_manifest

    check_manifest(manifest_for(tokenizer), str(tmp_path), tokenizer=tokenizer, sequence_len=32, top_k=K)
    with pytest.raises(ValueError, match=rf"manifest.json: {field} "):
        check_manifest(manifest_for(tokenizer, **changes), str(tmp_path), tokenizer=tokenizer, sequence_len=32,
                       top_k=top_k)


@pytest.mark.parametrize(("stored", "wanted"), [("teacher", "dataset"), ("dataset", "teacher")])
def test_manifest_of_other_sequences_is_refused(tokenizer, tmp_path, stored, wanted):
    from axolotl_xkd.store.read import check_manifest

    with pytest.raises(ValueError, match=rf"manifest.json: sequences '{stored}' differs from xkd.sequences '{wanted}'"):
        check_manifest(manifest_for(tokenizer, sequences=stored), str(tmp_path), tokenizer=tokenizer, sequence_len=32,
                       top_k=K, sequences=wanted)


def test_other_tokenizer_has_another_hash(tokenizer):
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    assert tokenizer_hash(other) != tokenizer_hash(tokenizer) == tokenizer_hash(build_tokenizer())


def expected_dense(row: dict) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(row["labels"]), K), np.int64)
    logprobs = np.full((len(row["labels"]), K), -np.inf, np.float32)
    mask = response_mask(np.asarray(row["labels"]))
    ids[mask], logprobs[mask] = decode({TOPK_PACKED: row[TOPK_PACKED]}, K)
    return ids, logprobs


def test_unpacked_collator_aligns_and_pads(tokenizer):
    rng = np.random.default_rng(6)
    rows = [make_row(rng, 9, 5), make_row(rng, 6, 2)]
    batch = TopKDataCollator(tokenizer, top_k=K, padding=True)([dict(r) for r in rows])
    assert batch[TEACHER_IDS].shape == (*batch["input_ids"].shape, K) == (2, 9, K)
    for b, row in enumerate(rows):
        ids, logprobs = expected_dense(row)
        n = len(row["labels"])
        torch.testing.assert_close(batch[TEACHER_LOGPROBS][b, :n], torch.from_numpy(logprobs))
        assert torch.equal(batch[TEACHER_IDS][b, :n], torch.from_numpy(ids))
        assert torch.isneginf(batch[TEACHER_LOGPROBS][b, n:]).all()
    signal = PrecomputedTeacherSource(K).get_signal(batch)
    assert signal.valid.any(-1).sum() == sum(int(response_mask(np.asarray(r["labels"])).sum()) for r in rows)


def test_packed_collator_keeps_each_segment_aligned(tokenizer):
    rng = np.random.default_rng(7)
    packs = [[make_row(rng, 7, 3), make_row(rng, 5, 2)], [make_row(rng, 8, 4)]]
    collator = TopKV2BatchSamplerCollator(tokenizer, top_k=K, padding=True)
    batch = collator([[dict(r) for r in pack] for pack in packs])
    assert batch[TEACHER_IDS].shape == (2, 12, K)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]
    first_ids, first_lp = expected_dense(packs[0][0])
    second_ids, second_lp = expected_dense(packs[0][1])
    torch.testing.assert_close(batch[TEACHER_LOGPROBS][0], torch.from_numpy(np.concatenate([first_lp, second_lp])))
    # the last position of the first segment predicts nothing inside its own sequence
    assert torch.isneginf(batch[TEACHER_LOGPROBS][0, 6]).all()
    assert torch.isneginf(batch[TEACHER_LOGPROBS][1, 8:]).all()


def test_full_vocabulary_topk_has_no_tail_mass():
    """Regression: with k = |V| float16 rounding left teacher mass in the empty tail and made
    KL(p_T || pi) infinite."""
    torch.manual_seed(0)
    teacher = torch.log_softmax(torch.randn(2, 3, V), -1)
    student = torch.log_softmax(torch.randn(2, 3, V), -1)
    values, ids = teacher.topk(V, -1)
    rounded = values.half().float() - 1e-3  # leaves about 0.1% of the mass uncovered
    s_cat, t_cat = paired_categories(student, TopKSignal(ids, rounded), temperature=1.0, topk_tail=True)
    got = forward_kl(s_cat, t_cat)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, forward_kl(student, teacher), rtol=2e-3, atol=2e-3)


def test_axolotl_kd_v2_rows_map_to_the_student_alignment():
    from datasets import Dataset

    from axolotl_xkd.store.read import from_axolotl_kd_v2

    input_ids, labels = [1, 10, 11, 12, 2], [-100, -100, 11, 12, 2]
    target_ids = [[i, i + 1] for i in range(5)]  # entry i marked by its position
    logprobs = [[-0.1 * (i + 1), -3.0] for i in range(5)]
    data = Dataset.from_dict({"input_ids": [input_ids], "labels": [labels], "target_token_ids": [target_ids],
                              "logprobs": [logprobs]})
    converted, k = from_axolotl_kd_v2(data, path="v2", top_k=None)
    assert k == 2
    row = converted.to_pylist()[0]
    # response positions 1, 2, 3 (their next labels are unmasked) keep entries 1, 2, 3: no shift
    assert row[TOPK_IDS] == [1, 2, 2, 3, 3, 4]
    np.testing.assert_allclose(row[TOPK_LOGPROBS], [-0.2, -3.0, -0.3, -3.0, -0.4, -3.0], rtol=1e-6)
    short = Dataset.from_dict({"input_ids": [input_ids], "labels": [labels], "target_token_ids": [target_ids[1:]],
                               "logprobs": [logprobs[1:]]})
    with pytest.raises(RowError, match="row 0, field 'target_token_ids': 4 positions for 5 input_ids"):
        from_axolotl_kd_v2(short, path="v2", top_k=None)
