"""A store among several teachers (teachers/recorded.py): each batch sequence is found in the store by its tokens and
labels, and gets the records the single-store collator would give the same row, packed or padded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from axolotl_xkd.store.collate import dense_topk
from axolotl_xkd.store.write import shard_table
from axolotl_xkd.teachers.recorded import RecordedTeacherSource

K = 3
ROWS = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
        {"input_ids": [5, 6, 4, 4], "labels": [-100, 6, 4, 4]},
        {"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}]


def records(row: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, k) ids and log-probs for the row's response positions."""
    rng = np.random.default_rng(seed)
    count = int((np.asarray(row["labels"][1:]) != -100).sum())
    ids = np.stack([rng.choice(20, K, replace=False) for _ in range(count)]) if count else np.zeros((0, K), int)
    logprobs = np.log(rng.dirichlet(np.ones(K + 1), size=count)[:, :K]).astype(np.float32)
    return ids, logprobs


@pytest.fixture
def source() -> RecordedTeacherSource:
    table = shard_table(ROWS, [records(r, i) for i, r in enumerate(ROWS)], encoding="split", logprob_dtype="float32")
    return RecordedTeacherSource([Dataset(table)], top_k=K, where="xkd.teachers[0].path='store'")


def expected(feature: dict) -> tuple[np.ndarray, np.ndarray]:
    _, ids, logprobs = dense_topk(feature, K)
    return ids, logprobs


def test_packed_and_padded_sequences_get_the_collators_records(source):
    table = source.splits[0]
    first, second = table[0], table[1]
    packed = first["input_ids"] + second["input_ids"]
    batch = {
        "input_ids": torch.tensor([packed, second["input_ids"] + [0] * 5]),
        "labels": torch.tensor([first["labels"] + second["labels"], second["labels"] + [-100] * 5]),
        "attention_mask": torch.tensor([[1] * 9, [1] * 4 + [0] * 5]),
        "position_ids": torch.tensor([list(range(5)) + list(range(4)), list(range(9))]),
    }
    signal = source.get_signal(batch)
    ids_a, lp_a = expected(first)
    ids_b, lp_b = expected(second)
    assert torch.equal(signal.token_ids[0], torch.from_numpy(np.concatenate([ids_a, ids_b])))
    assert torch.equal(signal.logprobs[0], torch.from_numpy(np.concatenate([lp_a, lp_b])))
    assert torch.equal(signal.logprobs[1, :4], torch.from_numpy(lp_b))
    assert not torch.isfinite(signal.logprobs[1, 4:]).any()


def test_a_sequence_the_store_does_not_hold_is_named(source):
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 1]]), "labels": torch.tensor([[-100, -100, 7, 8, 1]])}
    with pytest.raises(KeyError, match=r"xkd.teachers\[0\].path='store': batch row 0 \(tokens 0..4\) is not in the"):
        source.get_signal(batch)


def test_a_store_of_routed_generations_leaves_other_teachers_sequences_empty(source):
    """A store holding only its teacher's routed rows (`partial`) is asked about packed rows that also hold other
    teachers' sequences: those get no entry, its own sequence its records."""
    partial = RecordedTeacherSource(source.splits, top_k=K, where="xkd.teachers[0].path='store'", partial=True)
    first = source.splits[0][0]
    other = {"input_ids": [5, 6, 7, 8, 1], "labels": [-100, -100, 7, 8, 1]}
    batch = {"input_ids": torch.tensor([first["input_ids"] + other["input_ids"]]),
             "labels": torch.tensor([first["labels"] + other["labels"]]),
             "position_ids": torch.tensor([list(range(5)) * 2])}
    signal = partial.get_signal(batch)
    assert torch.equal(signal.logprobs[0, :5], torch.from_numpy(expected(first)[1]))
    assert not torch.isfinite(signal.logprobs[0, 5:]).any()
