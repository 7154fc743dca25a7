"""chunked_xkd_loss equals the unchunked xkd_loss: loss, logged parts and gradients.

The reference is `xkd_loss` on the full logits hidden @ W^T (+ b); the chunked loss only ever forms
chunk_size (+1 look-ahead) rows of them. Gradients are compared w.r.t. the student's hidden states,
output layer (and bias) and the reward-head outputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from axolotl_xkd.losses import DIVERGENCES, Q_FORMS, TopKSignal, XKDHyperparams, xkd_loss
from axolotl_xkd.losses.chunked import chunked_xkd_loss
from axolotl_xkd.losses.signal import DenseHiddenSignal, DenseSignal
from axolotl_xkd.options import TD_TARGETS
from tests.support import spec_params

B, T, H, H_T, V, K = 2, 12, 6, 5, 17, 4
N = B * T
EOS = 2
FP32 = {"atol": 1e-5, "rtol": 5e-4}


def make_inputs(seed: int = 0, *, packed: bool = False, dtype=torch.float32) -> dict:
    """Hidden states, output layers, labels (prompt mask, mid-row EOS, masked tail) and both teacher kinds."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt
    labels[0, 7] = EOS  # EOS inside row 0, more labels follow
    labels[1, 9:] = -100  # masked tail
    position_ids = None
    if packed:
        # Segments of row 0 split at t = 6 and of row 1 at t = 4: flat positions 6 and 16. With chunk
        # sizes 6 and 4 (and 2) the first boundary falls exactly on a chunk edge.
        position_ids = torch.tensor([list(range(6)) + list(range(6)), list(range(4)) + list(range(8))])
    teacher_hidden = torch.randn(B, T, H_T, generator=g, dtype=dtype)
    teacher_weight = torch.randn(V, H_T, generator=g, dtype=dtype)
    teacher_lp = torch.log_softmax(teacher_hidden @ teacher_weight.T, -1)
    top = teacher_lp.topk(K, dim=-1)
    ids, lps = top.indices.clone(), top.values.clone()
    lps[0, 4, -1] = -math.inf  # a padded slot
    lps[1, 2, 1:] = -math.inf
    ids[1, 2, 1:] = 0
    return {
        "hidden": torch.randn(B, T, H, generator=g, dtype=dtype),
        "weight": torch.randn(V, H, generator=g, dtype=dtype),
        "bias": torch.randn(V, generator=g, dtype=dtype),
        "mean": torch.randn(B, T, generator=g, dtype=dtype),
        "log_std": torch.randn(B, T, generator=g, dtype=dtype) * 0.5,
        "labels": labels,
        "position_ids": position_ids,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
        "topk": TopKSignal(ids, lps),
    }


def run_both(params: XKDHyperparams, teacher_kind: str, chunk_size: int, *, packed: bool = False,
             with_bias: bool = False, seed: int = 0, dtype=torch.float32):
    """(reference, chunked) as (XKDLossOutput, {name: gradient}) pairs on the same inputs."""
    x = make_inputs(seed, packed=packed, dtype=dtype)
    results = []
    for chunked in (False, True):
        leaves = {k: x[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias", "mean", "log_std")}
        bias = leaves["bias"] if with_bias else None
        common = {"mu": leaves["mean"], "log_sigma": leaves["log_std"], "params": params,
                  "position_ids": x["position_ids"], "eos_token_id": EOS}
        if chunked:
            dense = DenseHiddenSignal(x["teacher_hidden"], x["teacher_weight"])
            teacher = x["topk"] if teacher_kind == "topk" else dense
            out = chunked_xkd_loss(leaves["hidden"], leaves["weight"], x["labels"], teacher=teacher,
                                   chunk_size=chunk_size, output_bias=bias, **common)
        else:
            teacher = x["topk"] if teacher_kind == "topk" else DenseSignal(x["teacher_hidden"] @ x["teacher_weight"].T)
            logits = leaves["hidden"] @ leaves["weight"].T
            out = xkd_loss(logits + bias if with_bias else logits, x["labels"], teacher=teacher, **common)
        names = [k for k in leaves if with_bias or k != "bias"]
        grads = torch.autograd.grad(out.loss, [leaves[k] for k in names], allow_unused=True)
        results.append((out, dict(zip(names, grads))))
    return results


def assert_same(ref, got, **tol) -> None:
    (ref_out, ref_grads), (out, grads) = ref, got
    for field in ref_out._fields:
        torch.testing.assert_close(getattr(out, field), getattr(ref_out, field), **tol, msg=lambda m, f=field: f"{f}: {m}")
    for name, ref_grad in ref_grads.items():
        if ref_grad is None:  # the reference does not depend on it (e.g. no TD term): neither may the chunked loss
            assert grads[name] is None or torch.count_nonzero(grads[name]) == 0, name
            continue
        torch.testing.assert_close(grads[name], ref_grad, **tol, msg=lambda m, n=name: f"d loss / d {n}: {m}")


@pytest.mark.parametrize("chunk_size", [6, 5])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_every_divergence_matches_unchunked(name, teacher_kind, chunk_size):
    """Chunk sizes 6 (divides N = 24) and 5 (does not), with CE and both AVRIL terms on."""
    params = spec_params(divergence=name, alpha_ce=0.3, temperature=1.7, beta=0.3, skew_alpha=0.2)
    assert_same(*run_both(params, teacher_kind, chunk_size), **FP32)


@pytest.mark.parametrize("chunk_size", [4, 7])
@pytest.mark.parametrize("td_target", TD_TARGETS)
@pytest.mark.parametrize("q_form", Q_FORMS)
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_every_td_form_matches_unchunked(teacher_kind, q_form, td_target, chunk_size):
    """Each q_form and td_target, gamma < 1 and tau != 1, on both teacher kinds, so TD pairs straddle chunk edges."""
    params = spec_params(q_form=q_form, td_target=td_target, gamma=0.9, temperature=0.8, ava_alpha=3.0,
                         td_weight=1.3, reward_kl_weight=0.7)
    assert_same(*run_both(params, teacher_kind, chunk_size), **FP32)


@pytest.mark.parametrize("alpha", [0.5, 70.0], ids=["small", "shifted"])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_ava_band_widths(teacher_kind, alpha):
    """The kernel's exp(alpha pi) is taken without a row max; past alpha = 60 it is shifted by alpha instead."""
    params = spec_params(q_form="ava", ava_alpha=alpha, alpha_ce=0.2, gamma=0.95)
    assert_same(*run_both(params, teacher_kind, 5, dtype=torch.float64), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("chunk_size", [2, 4, 6])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_packed_rows_with_segment_boundary_on_chunk_edge(teacher_kind, chunk_size):
    """Flat position 6 starts a packed segment and is a chunk edge: no TD pair crosses it, in float64 tightly."""
    for q_form in Q_FORMS:
        params = spec_params(q_form=q_form, alpha_ce=0.5, reward_input="state")
        assert_same(*run_both(params, teacher_kind, chunk_size, packed=True, dtype=torch.float64),
                    atol=1e-10, rtol=1e-9)


def test_bias_topk_without_tail_and_no_tau_scaling():
    params = spec_params(divergence="jsd", topk_tail=False, scale_by_tau_squared=False, temperature=2.0)
    assert_same(*run_both(params, "topk", 5, with_bias=True), **FP32)
    assert_same(*run_both(params, "dense", 5, with_bias=True), **FP32)


def test_without_reward_terms_reduces_to_distillation():
    """lambda = w_kl = 0: no reward-head inputs needed, no gradient for them, and the same loss."""
    params = spec_params(divergence="reverse_kl", td_weight=0.0, reward_kl_weight=0.0, alpha_ce=1.0)
    ref, got = run_both(params, "dense", 5)
    assert_same(ref, got, **FP32)
    assert got[1]["mean"] is None and got[1]["log_std"] is None


def test_padded_vocabulary_rows_are_cut_and_get_zero_gradient():
    """W with more rows than the tokenizer (vocab_size) equals the trainer's logits[..., :vocab_size]."""
    x = make_inputs(1)
    params = spec_params(divergence="jsd", alpha_ce=0.5)
    padded_w = torch.cat([x["weight"], torch.randn(3, H)]).requires_grad_(True)
    padded_tw = torch.cat([x["teacher_weight"], torch.randn(3, H_T)])
    hidden = x["hidden"].clone().requires_grad_(True)
    out = chunked_xkd_loss(hidden, padded_w, x["labels"], teacher=DenseHiddenSignal(x["teacher_hidden"], padded_tw),
                           mu=x["mean"], log_sigma=x["log_std"], params=params, chunk_size=7,
                           vocab_size=V, eos_token_id=EOS)
    grad_h, grad_w = torch.autograd.grad(out.loss, [hidden, padded_w])
    ref_hidden, ref_w = x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)
    ref = xkd_loss((ref_hidden @ torch.cat([ref_w, padded_w[V:].detach()]).T)[..., :V], x["labels"],
                   teacher=DenseSignal((x["teacher_hidden"] @ padded_tw.T)[..., :V]), mu=x["mean"],
                   log_sigma=x["log_std"], params=params, eos_token_id=EOS)
    ref_h, ref_wg = torch.autograd.grad(ref.loss, [ref_hidden, ref_w])
    torch.testing.assert_close(out.loss, ref.loss, **FP32)
    torch.testing.assert_close(grad_h, ref_h, **FP32)
    torch.testing.assert_close(grad_w[:V], ref_wg, **FP32)
    assert torch.count_nonzero(grad_w[V:]) == 0


def test_frozen_output_layer_gets_no_gradient():
    """LoRA: the base output layer does not require grad; hidden and reward gradients are unchanged."""
    x = make_inputs(2)
    params = spec_params(q_form="logprobs", alpha_ce=0.2)
    teacher = DenseHiddenSignal(x["teacher_hidden"], x["teacher_weight"])
    frozen = x["weight"].clone()
    leaves = [x[k].clone().requires_grad_(True) for k in ("hidden", "mean", "log_std")]
    out = chunked_xkd_loss(leaves[0], frozen, x["labels"], teacher=teacher, mu=leaves[1],
                           log_sigma=leaves[2], params=params, chunk_size=5, eos_token_id=EOS)
    out.loss.backward()
    assert frozen.grad is None
    ref_leaves = [x[k].clone().requires_grad_(True) for k in ("hidden", "mean", "log_std")]
    dense = DenseSignal(x["teacher_hidden"] @ x["teacher_weight"].T)
    ref = xkd_loss(ref_leaves[0] @ frozen.T, x["labels"], teacher=dense,
                   mu=ref_leaves[1], log_sigma=ref_leaves[2], params=params, eos_token_id=EOS)
    ref.loss.backward()
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, **FP32)


def test_bf16_inputs_are_computed_in_fp32():
    """bf16 hidden states and output layer: the loss matches xkd_loss on the same bf16 logits."""
    x = make_inputs(3)
    params = spec_params(divergence="forward_kl", alpha_ce=0.5)
    hidden, weight = x["hidden"].bfloat16(), x["weight"].bfloat16()
    teacher = DenseHiddenSignal(x["teacher_hidden"].bfloat16(), x["teacher_weight"].bfloat16())
    out = chunked_xkd_loss(hidden, weight, x["labels"], teacher=teacher, mu=x["mean"],
                           log_sigma=x["log_std"], params=params, chunk_size=5, eos_token_id=EOS)
    ref = xkd_loss(hidden @ weight.T, x["labels"], teacher=DenseSignal(teacher.hidden @ teacher.weight.T),
                   mu=x["mean"], log_sigma=x["log_std"], params=params, eos_token_id=EOS)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, atol=5e-2, rtol=5e-2)


def test_no_grad_evaluation_matches():
    x = make_inputs(4)
    params = spec_params(td_target="teacher_expected")
    with torch.no_grad():
        out = chunked_xkd_loss(x["hidden"], x["weight"], x["labels"], teacher=x["topk"], mu=x["mean"],
                               log_sigma=x["log_std"], params=params, chunk_size=5, eos_token_id=EOS)
        ref = xkd_loss(x["hidden"] @ x["weight"].T, x["labels"], teacher=x["topk"], mu=x["mean"],
                       log_sigma=x["log_std"], params=params, eos_token_id=EOS)
    for field in ref._fields:
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), **FP32)


def test_teacher_vocabulary_mismatch_names_the_fix():
    x = make_inputs(6)
    small = DenseHiddenSignal(x["teacher_hidden"], x["teacher_weight"][: V - 2])
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_xkd_loss(x["hidden"], x["weight"], x["labels"], teacher=small, mu=x["mean"],
                         log_sigma=x["log_std"], params=spec_params())



def test_padded_topk_slot_sharing_a_real_id_keeps_it_in_the_top_k():
    """Regression: a padded slot (-inf) whose placeholder id equals a real top-k id cleared that id from the
    top-k mask (bool scatter_, last write wins), so the token counted in both its slot and the tail."""
    from axolotl_xkd.losses.categories import student_topk_categories

    logprobs = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), -1)
    signal = TopKSignal(torch.tensor([[1, 0, 0]]), torch.tensor([[-1.0, -1.5, -math.inf]]))
    cats = student_topk_categories(logprobs, signal, tail=True)
    torch.testing.assert_close(cats.exp().sum(), torch.tensor(1.0))


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_autograd_mode_equals_hand_written_gradients(teacher_kind):
    """mode='autograd' (torch.func per chunk) and the default hand-written path agree on the default config."""
    x = make_inputs(7)
    teacher = x["topk"] if teacher_kind == "topk" else DenseHiddenSignal(x["teacher_hidden"], x["teacher_weight"])
    results = []
    for mode in ("fused", "autograd"):
        leaves = [x[k].clone().requires_grad_(True) for k in ("hidden", "weight", "mean", "log_std")]
        out = chunked_xkd_loss(leaves[0], leaves[1], x["labels"], teacher=teacher, mu=leaves[2],
                               log_sigma=leaves[3], params=spec_params(alpha_ce=0.4, temperature=1.3),
                               chunk_size=5, eos_token_id=EOS, mode=mode)
        results.append((out.loss, torch.autograd.grad(out.loss, leaves)))
    torch.testing.assert_close(results[0][0], results[1][0], **FP32)
    for got, ref in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, ref, **FP32)


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_row_blocks_inside_a_chunk(monkeypatch, teacher_kind):
    """The hand-written kernel walks each chunk in cache-sized row blocks; force 2-row blocks (3 per chunk of 5)."""
    from axolotl_xkd.losses import blocks, fused

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 2 * V)
    for params in (spec_params(alpha_ce=0.5, q_form="logprobs"), spec_params(q_form="ava", ava_alpha=2.0),
                   spec_params(divergence="sequence", alpha_ce=0.5, temperature=1.4)):
        assert fused.supports(params, teacher_kind, True)
        assert_same(*run_both(params, teacher_kind, 5), **FP32)


@pytest.mark.parametrize("td_target", ["teacher_logprob", "observed"])
def test_only_counted_rows_reach_the_output_layer_where_no_td_pair_reads_the_next(monkeypatch, td_target):
    """With a fixed TD target (the defaults) or no TD term, every term of a row reads that row alone, so the prompt
    and masked rows form no logits; a TD pair that reads the next row keeps every row. Equal to xkd_loss either way
    (the tests above)."""
    import axolotl_xkd.losses.chunked as chunked

    formed = []
    real = chunked._Plan.teacher_rows

    def counting(plan, start, stop, **kwargs):
        formed.append(stop - start)
        return real(plan, start, stop, **kwargs)

    monkeypatch.setattr(chunked._Plan, "teacher_rows", counting)
    x = make_inputs()
    params = spec_params(divergence="forward_kl", td_target=td_target)
    mu, log_sigma = x["mean"].requires_grad_(), x["log_std"].requires_grad_()
    out = chunked_xkd_loss(x["hidden"], x["weight"], x["labels"], teacher=x["topk"], params=params, mu=mu,
                           log_sigma=log_sigma, eos_token_id=EOS, chunk_size=N)
    counted = int(out.num_tokens)
    assert counted < N - 3  # the prompt, the masked tail and each row's last position are not counted
    assert formed == ([counted] if td_target == "teacher_logprob" else [N])
