"""The teacher signals' own operations (losses/signal.py) against plain torch on small float64 tensors: rows, flat,
cut, formed, log_probs and top_k, for the dense, dense-hidden and top-k forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from axolotl_xkd.losses import blocks
from axolotl_xkd.losses.signal import DenseHiddenSignal, DenseSignal, TopKSignal

B, T, H, V, K = 2, 5, 4, 9, 3


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, dtype=torch.float64, generator=g)
    weight = torch.randn(V, H, dtype=torch.float64, generator=g)
    bias = torch.randn(V, dtype=torch.float64, generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    lps = torch.log_softmax(torch.randn(B, T, V, dtype=torch.float64, generator=g), -1).gather(-1, ids)
    return {"hidden": hidden, "weight": weight, "bias": bias, "ids": ids, "lps": lps,
            "logits": hidden @ weight.T + bias}


INDICES = {
    "slice": slice(1, 4),
    "mask": torch.tensor([[True, False, True, False, False], [False, True, True, False, True]]),
    "index": torch.tensor([1, 0]),
    "pairs": (torch.tensor([0, 1, 1]), torch.tensor([4, 0, 2])),
}


@pytest.mark.parametrize("name", list(INDICES))
def test_rows_index_every_per_position_tensor(name):
    x, index = tensors(), INDICES[name]
    assert torch.equal(DenseSignal(x["logits"]).rows(index).logits, x["logits"][index])
    topk = TopKSignal(x["ids"], x["lps"]).rows(index)
    assert torch.equal(topk.token_ids, x["ids"][index]) and torch.equal(topk.logprobs, x["lps"][index])
    hidden = DenseHiddenSignal(x["hidden"], x["weight"], x["bias"]).rows(index)
    assert torch.equal(hidden.hidden, x["hidden"][index]) and hidden.weight is x["weight"] and hidden.bias is x["bias"]


def test_positions_vocab_size_and_flat():
    x = tensors()
    signals = [DenseSignal(x["logits"]), TopKSignal(x["ids"], x["lps"]),
               DenseHiddenSignal(x["hidden"], x["weight"], x["bias"])]
    assert [s.positions for s in signals] == [torch.Size((B, T))] * 3
    assert [s.vocab_size for s in signals] == [V, None, V]
    assert [s.kind for s in signals] == ["dense", "topk", "dense"]
    flat = [s.flat() for s in signals]
    assert [f.positions for f in flat] == [torch.Size((B * T,))] * 3
    assert torch.equal(flat[0].logits, x["logits"].reshape(B * T, V))
    assert torch.equal(flat[1].token_ids, x["ids"].reshape(B * T, K))
    assert torch.equal(flat[2].hidden, x["hidden"].reshape(B * T, H))


def test_cut_keeps_the_first_tokens_of_a_dense_teacher():
    x, v = tensors(), V - 2
    assert torch.equal(DenseSignal(x["logits"]).cut(v).logits, x["logits"][..., :v])
    cut = DenseHiddenSignal(x["hidden"], x["weight"], x["bias"]).cut(v)
    assert cut.vocab_size == v
    torch.testing.assert_close(cut.formed().logits, x["logits"][..., :v], atol=1e-12, rtol=0)
    assert DenseHiddenSignal(x["hidden"], x["weight"]).cut(v).bias is None
    topk = TopKSignal(x["ids"], x["lps"])
    assert topk.cut(v) is topk


def test_formed_logits_carry_no_gradient_and_writable_ones_are_fresh():
    x = tensors()
    weight = x["weight"].clone().requires_grad_(True)
    formed = DenseHiddenSignal(x["hidden"], weight, x["bias"]).formed()
    assert not formed.logits.requires_grad
    torch.testing.assert_close(formed.logits, x["logits"], atol=1e-12, rtol=0)
    dense = DenseSignal(x["logits"])
    assert dense.formed().logits is x["logits"]
    fresh = dense.formed(writable=True).logits
    assert fresh.data_ptr() != x["logits"].data_ptr() and torch.equal(fresh, x["logits"])
    half = DenseSignal(x["logits"].bfloat16()).formed().logits
    assert half.dtype == torch.float32
    topk = TopKSignal(x["ids"], x["lps"])
    assert topk.formed(writable=True) is topk


def test_log_probs_of_hidden_rows():
    x = tensors()
    rows = (torch.tensor([0, 1, 1]), torch.tensor([3, 1, 4]))
    got = DenseHiddenSignal(x["hidden"], x["weight"], x["bias"]).log_probs(rows)
    want = torch.log_softmax(F.linear(x["hidden"][rows], x["weight"], x["bias"]), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("block_rows", [1, 3, 100])
def test_top_k_of_dense_and_hidden_signals(monkeypatch, block_rows):
    """The k largest log-probs at tau = 1 (and their ids), over blocks of rows of any size."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", block_rows * V)
    x = tensors(1)
    want = torch.log_softmax(x["logits"], dim=-1).topk(K, dim=-1)
    for signal in (DenseSignal(x["logits"]), DenseHiddenSignal(x["hidden"], x["weight"], x["bias"])):
        got = signal.top_k(K)
        assert got.positions == (B, T) and torch.equal(got.token_ids, want.indices)
        torch.testing.assert_close(got.logprobs, want.values, atol=1e-12, rtol=0)
    empty = DenseHiddenSignal(x["hidden"][:, :0], x["weight"]).top_k(K)
    assert empty.token_ids.shape == (B, 0, K) and empty.logprobs.shape == (B, 0, K)


def test_top_k_of_a_record_keeps_its_largest_entries():
    x = tensors(2)
    record = TopKSignal(x["ids"], x["lps"])
    assert record.top_k(K) is record and record.top_k(K + 2) is record
    cut = record.top_k(2)
    values, slots = x["lps"].topk(2, dim=-1)
    assert torch.equal(cut.logprobs, values) and torch.equal(cut.token_ids, x["ids"].gather(-1, slots))
