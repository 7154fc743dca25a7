"""The reward targets whose sum carries the whole response: td_target soft and teacher_logprob.

Per-token TD_i are read off the loss itself: with alpha_kd = w_kl = 0, lambda = 1, mu = 0 and sigma = 1 the
loss is sum_i (0.5 log 2 pi + 0.5 TD_i^2), so d loss / d mu_i = -TD_i (mu_i sits at h_{i+1}, next_state).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from axolotl_xkd.losses import DenseSignal, TopKSignal, fused, xkd_loss
from axolotl_xkd.losses.categories import TAIL_FLOOR, teacher_token_logprob
from axolotl_xkd.losses.chunked import chunked_xkd_loss
from tests.reference import reference_xkd
from tests.support import spec_params
from tests.unit.test_chunked import assert_same, run_both
from tests.unit.test_loss_reference import EOS, check_against_reference, make_batch, teachers

NEW_TARGETS = ("soft", "teacher_logprob")
TAU = 1.3


def per_token_td(logits: torch.Tensor, labels: torch.Tensor, *, teacher=None, position_ids=None, chunk_size=None,
                 **params) -> torch.Tensor:
    """TD_i (B, T) at position i (0 where i has no action), from -d loss / d mu at mu = 0, sigma = 1."""
    hp = spec_params(alpha_kd=0.0, reward_kl_weight=0.0, td_weight=1.0, temperature=TAU, **params)
    mu = torch.zeros(labels.shape, dtype=logits.dtype, requires_grad=True)
    log_std = torch.zeros(labels.shape, dtype=logits.dtype)
    common = {"teacher": teacher, "mu": mu, "log_sigma": log_std, "params": hp,
              "position_ids": position_ids, "eos_token_id": EOS}
    if chunk_size is None:
        out = xkd_loss(logits, labels, **common)
    else:  # logits = hidden @ I^T: the chunked loss on the same logits
        eye = torch.eye(logits.shape[-1], dtype=logits.dtype)
        out = chunked_xkd_loss(logits, eye, labels, chunk_size=chunk_size, **common)
    (grad,) = torch.autograd.grad(out.loss, mu)
    td = torch.zeros_like(grad)
    td[:, :-1] = -grad[:, 1:]
    return td


def one_response(seed: int, *, vocab: int = 9, prompt: int = 3, length: int = 5, pad: int = 2):
    """Logits (1, T, V) and labels: a masked prompt, `length` response tokens (no EOS), then masked padding."""
    g = torch.Generator().manual_seed(seed)
    total = prompt + length + pad
    logits = torch.randn(1, total, vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.full((1, total), -100)
    labels[0, prompt:prompt + length] = torch.randint(3, vocab, (length,), generator=g)
    return logits, labels


def response_logliks(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """sum_i log softmax(z_i / tau)[a_i] over the response, and the first response position i_0."""
    steps = [i for i in range(labels.shape[1] - 1) if labels[0, i + 1] != -100]
    logpi = torch.log_softmax(logits[0] / TAU, dim=-1)
    return sum(logpi[i, labels[0, i + 1]] for i in steps), steps[0]


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_soft_sum_is_loglik_plus_first_value(chunk_size):
    """gamma = 1, q_form logits: sum_i TD_i = sum_i log pi(a_i | s_i) + V(s_0), V(s) = logsumexp(z / tau)."""
    logits, labels = one_response(0)
    td = per_token_td(logits, labels, q_form="logits", td_target="soft", gamma=1.0, chunk_size=chunk_size)
    loglik, first = response_logliks(logits, labels)
    v0 = torch.logsumexp(logits[0, first] / TAU, dim=-1)
    torch.testing.assert_close(td.sum(), loglik + v0, atol=1e-12, rtol=1e-12)


def test_soft_with_logprobs_sums_to_the_loglik():
    """q_form logprobs: Q(s, .) is normalised, V = 0, so the summed TD is exactly the response's log-likelihood."""
    logits, labels = one_response(1)
    td = per_token_td(logits, labels, q_form="logprobs", td_target="soft", gamma=1.0)
    torch.testing.assert_close(td.sum(), response_logliks(logits, labels)[0], atol=1e-12, rtol=1e-12)


def test_observed_sum_telescopes_to_the_first_q():
    """The bug the soft target fixes (rerank.md): with gamma = 1 the observed TD sums to Q(s_0, a_0) alone."""
    logits, labels = one_response(2)
    td = per_token_td(logits, labels, q_form="logits", td_target="observed", gamma=1.0)
    first = response_logliks(logits, labels)[1]
    torch.testing.assert_close(td.sum(), logits[0, first, labels[0, first + 1]] / TAU, atol=1e-12, rtol=1e-12)


def test_soft_eos_inside_the_response_starts_a_new_episode():
    """Terminal convention: after an EOS the next episode adds its own V(first state) to the sum."""
    logits, labels = one_response(3, length=6)
    labels[0, 5] = EOS  # action of position 4; positions 5.. form the next episode
    td = per_token_td(logits, labels, q_form="logits", td_target="soft", gamma=1.0)
    loglik, first = response_logliks(logits, labels)
    values = torch.logsumexp(logits[0, [first, 5]] / TAU, dim=-1).sum()
    torch.testing.assert_close(td.sum(), loglik + values, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_teacher_logprob_sum_is_the_teachers_loglik(chunk_size):
    """TD_i = log p_T(a_i | s_i) at tau: the summed target is the teacher's log-likelihood of the response."""
    logits, labels = one_response(4)
    teacher_logits = torch.randn_like(logits) * 2
    td = per_token_td(logits, labels, teacher=DenseSignal(teacher_logits), td_target="teacher_logprob",
                      chunk_size=chunk_size)
    torch.testing.assert_close(td.sum(), response_logliks(teacher_logits, labels)[0], atol=1e-12, rtol=1e-12)


def test_teacher_logprob_target_carries_no_gradient_into_the_student():
    """A fixed target: with only the TD term on, the student logits get exactly zero gradient; mu does not."""
    logits, labels, t_logits, ids, lps, mu, log_std, pos = make_batch(0, packed=True)
    leaves = [x.clone().requires_grad_(True) for x in (logits, mu, log_std)]
    for signal in (DenseSignal(t_logits), TopKSignal(ids, lps)):
        params = spec_params(alpha_kd=0.0, reward_kl_weight=0.0, td_target="teacher_logprob")
        out = xkd_loss(leaves[0], labels, teacher=signal, mu=leaves[1], log_sigma=leaves[2],
                       params=params, position_ids=pos, eos_token_id=EOS)
        grad_logits, grad_mu, _ = torch.autograd.grad(out.loss, leaves, allow_unused=True)
        assert grad_logits is None or torch.count_nonzero(grad_logits) == 0
        assert torch.count_nonzero(grad_mu) > 0


def test_topk_teacher_logprob_categories():
    """In the top k: its category's log-prob (the stored one at tau = 1); outside: the tail spread uniformly
    over the V - k_i tokens outside, log(max(p_tail, 2^-11) / (V - k_i)); padded slots do not count in k_i."""
    vocab = 6
    ids = torch.tensor([[1, 4, 0], [1, 4, 0], [2, 3, 5], [2, 3, 5]])
    probs = torch.tensor([[0.5, 0.2, 0.0], [0.5, 0.2, 0.0], [0.7, 0.3 - 1e-9, 1e-9], [0.7, 0.3 - 1e-9, 1e-9]],
                         dtype=torch.float64)
    lps = torch.log(probs)
    lps[:2, 2] = -math.inf  # padded slot: k_i = 2
    actions = torch.tensor([4, 3, 5, 0])  # hit, tail, hit, tail of a top k covering everything (rounded)
    signal = TopKSignal(ids, lps)
    got = teacher_token_logprob(signal, actions, temperature=1.0, topk_tail=True, vocab_size=vocab)
    want = torch.tensor([math.log(0.2), math.log(0.3 / 4), math.log(1e-9), math.log(TAIL_FLOOR / 3)],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)
    renormalised = teacher_token_logprob(signal, actions, temperature=1.0, topk_tail=False, vocab_size=vocab)
    want = torch.tensor([math.log(0.2 / 0.7), math.log(TAIL_FLOOR / 4), math.log(1e-9), math.log(TAIL_FLOOR / 3)],
                        dtype=torch.float64)
    torch.testing.assert_close(renormalised, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("topk_tail", [True, False])
def test_topk_without_tail_mass_matches_reference(topk_tail):
    """A top k whose probabilities sum to 1 with k < V: actions outside get the floored, finite target."""
    logits, labels, t_logits, ids, lps, mu, log_std, pos = make_batch(6)
    lps = torch.log_softmax(torch.where(torch.arange(4) < 3, lps, -math.inf), dim=-1)  # 3 ids hold all mass
    signal, ref_teacher = teachers(t_logits, ids, lps)["topk"]
    params = spec_params(td_target="teacher_logprob", topk_tail=topk_tail, temperature=0.9, alpha_kd=0.0)
    out = xkd_loss(logits, labels, teacher=signal, mu=mu, log_sigma=log_std, params=params,
                   position_ids=pos, eos_token_id=EOS)
    ref, _, _ = reference_xkd(logits, labels, teacher=ref_teacher, mu=mu, log_sigma=log_std,
                              hp=dataclasses.asdict(params), position_ids=pos, eos=EOS)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("topk_tail", [True, False])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("td_target", NEW_TARGETS)
def test_packed_rows_match_reference(td_target, teacher_kind, topk_tail):
    params = spec_params(td_target=td_target, topk_tail=topk_tail, q_form="logits", gamma=0.9, temperature=1.4,
                         reward_input="state", alpha_ce=0.2)
    check_against_reference(params, teacher_kind, seed=7, packed=True)


def test_soft_value_does_not_cross_a_packed_segment():
    """The last state of a packed segment is terminal: its logits (its action would cross into the next
    segment) enter no TD, while unpacked the same position's V(s) enters the TD before it."""
    logits, labels = one_response(8, prompt=0, length=8, pad=0)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    other = logits.clone()
    other[0, 3] += torch.linspace(-3.0, 3.0, logits.shape[-1], dtype=torch.float64)
    packed = [per_token_td(x, labels, q_form="logits", td_target="soft", position_ids=position_ids)
              for x in (logits, other)]
    torch.testing.assert_close(packed[1], packed[0], atol=0.0, rtol=0.0)
    unpacked = [per_token_td(x, labels, q_form="logits", td_target="soft") for x in (logits, other)]
    assert not torch.equal(unpacked[1][0, 2], unpacked[0][0, 2])


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("q_form", ["logits", "ava"])
@pytest.mark.parametrize("td_target", NEW_TARGETS)
def test_gradcheck(td_target, q_form, teacher_kind):
    logits, labels, t_logits, ids, lps, mu, log_std, pos = make_batch(9, packed=True)
    signal, _ = teachers(t_logits, ids, lps)[teacher_kind]
    params = spec_params(td_target=td_target, q_form=q_form, gamma=0.95, temperature=1.2, alpha_ce=0.3)

    def fn(z, m, s):
        return xkd_loss(z, labels, teacher=signal, mu=m, log_sigma=s, params=params,
                        position_ids=pos, eos_token_id=EOS).loss

    inputs = tuple(x.clone().requires_grad_(True) for x in (logits, mu, log_std))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("topk_tail", [True, False])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("td_target", NEW_TARGETS)
def test_chunked_packed_float64(td_target, teacher_kind, topk_tail):
    """Chunked == unchunked in float64 with a packed segment boundary on a chunk edge (chunk size 6)."""
    params = spec_params(td_target=td_target, topk_tail=topk_tail, q_form="logits", gamma=0.9, alpha_ce=0.3,
                         temperature=1.1)
    assert_same(*run_both(params, teacher_kind, 6, packed=True, dtype=torch.float64), atol=1e-10, rtol=1e-9)


def test_fused_path_defers_soft_to_autograd():
    """fused.py has no hand-written gradient for td_target soft; supports() must say so."""
    for teacher_kind in ("dense", "topk"):
        assert not fused.supports(spec_params(td_target="soft"), teacher_kind, True)


@pytest.mark.parametrize("blocks", ["whole", "two_rows"])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_fused_teacher_logprob_matches_unchunked(teacher_kind, temperature, blocks, monkeypatch):
    """The default target on the hand-written path: chunked == unchunked in float64 (packed rows, a chunk edge on a
    segment boundary), in whole chunks and in 2-row blocks (the dense teacher's blockwise log-sum-exp)."""
    from tests.unit.test_chunked import V

    if blocks == "two_rows":
        from axolotl_xkd.losses import blocks as row_blocks

        monkeypatch.setattr(row_blocks, "BLOCK_ELEMENTS", 2 * V)
    params = spec_params(td_target="teacher_logprob", q_form="ava", temperature=temperature, alpha_ce=0.3,
                         reward_kl_weight=0.4, td_weight=0.7)
    assert fused.supports(params, teacher_kind, True) == (teacher_kind == "dense" or temperature == 1.0)
    assert_same(*run_both(params, teacher_kind, 6, packed=True, dtype=torch.float64), atol=1e-10, rtol=1e-9)


def test_which_targets_need_the_teacher():
    assert spec_params(divergence="sequence", td_target="teacher_logprob").needs_teacher
    assert not spec_params(divergence="sequence", td_target="soft").needs_teacher
    logits, labels, *_ = make_batch(0)
    with pytest.raises(ValueError, match="teacher_logprob"):
        xkd_loss(logits, labels, teacher=None, mu=torch.zeros(labels.shape),
                 log_sigma=torch.zeros(labels.shape),
                 params=spec_params(divergence="sequence", td_target="teacher_logprob"))
    with pytest.raises(ValueError, match="td_target"):
        spec_params(td_target="soft_q")
