"""The X-KD loss against the float64 reference of tests/reference.py, plus gradient checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from axolotl_xkd.losses import DenseSignal, TopKSignal, XKDHyperparams, xkd_loss
from axolotl_xkd.options import TD_TARGETS
from tests.reference import reference_xkd
from tests.support import spec_params

B, T, V, K = 2, 7, 11, 4
EOS = 2


def make_batch(seed: int, *, packed: bool = False, dtype=torch.float64):
    """Random logits, labels with masked prompt, an EOS, a fully masked row part, and a top-k teacher with -inf."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    labels = torch.randint(3, V, (B, T), generator=g)
    labels[0, :2] = -100  # prompt
    labels[0, 4] = EOS  # an EOS in the middle of row 0 (followed by more labels)
    labels[1, :] = -100
    labels[1, 2:5] = torch.randint(3, V, (3,), generator=g)  # short response, then masked
    teacher_logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    t_lp = torch.log_softmax(teacher_logits, -1)
    top = t_lp.topk(K, dim=-1)
    ids, lps = top.indices.clone(), top.values.clone()
    lps[0, 3, -1] = -math.inf  # padded slot
    lps[1, 2, 1:] = -math.inf
    ids[1, 2, 1:] = 0
    mu = torch.randn(B, T, generator=g, dtype=dtype)
    log_sigma = torch.randn(B, T, generator=g, dtype=dtype) * 0.5
    position_ids = None
    if packed:
        position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]])
        labels[1, 3:] = torch.randint(3, V, (4,), generator=g)
    return logits, labels, teacher_logits, ids, lps, mu, log_sigma, position_ids


def teachers(teacher_logits, ids, lps):
    """(library signal, reference description) pairs for the dense and top-k teachers."""
    return {
        "dense": (DenseSignal(teacher_logits), {"kind": "dense", "logits": teacher_logits}),
        "topk": (TopKSignal(ids, lps), {"kind": "topk", "ids": ids, "logprobs": lps}),
    }


def check_against_reference(params: XKDHyperparams, teacher_kind: str, *, seed: int = 0, packed: bool = False):
    logits, labels, t_logits, ids, lps, mu, log_std, pos = make_batch(seed, packed=packed)
    signal, ref_teacher = teachers(t_logits, ids, lps)[teacher_kind]
    leaves = [x.clone().requires_grad_(True) for x in (logits, mu, log_std)]
    out = xkd_loss(leaves[0], labels, teacher=signal, mu=leaves[1], log_sigma=leaves[2],
                   params=params, position_ids=pos, eos_token_id=EOS)
    ref_leaves = [x.clone().requires_grad_(True) for x in (logits, mu, log_std)]
    ref, terms, count = reference_xkd(ref_leaves[0], labels, teacher=ref_teacher, mu=ref_leaves[1],
                                      log_sigma=ref_leaves[2], hp=dataclasses.asdict(params),
                                      position_ids=pos, eos=EOS)
    torch.testing.assert_close(out.loss, ref, atol=1e-9, rtol=1e-9)
    assert int(out.num_tokens) == count
    torch.testing.assert_close(out.td_nll, terms["td_nll"].detach(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.kl_prior, terms["kl_prior"].detach(), atol=1e-9, rtol=1e-9)
    grads = torch.autograd.grad(out.loss, leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize(
    "divergence,beta",
    [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0),
     ("skew_forward_kl", 0.5), ("skew_reverse_kl", 0.5), ("tvd", 0.5), ("sequence", 0.5)],
)
def test_divergences_match_reference(divergence, beta, teacher_kind):
    params = spec_params(divergence=divergence, beta=beta, skew_alpha=0.2, temperature=1.7, alpha_ce=0.3)
    check_against_reference(params, teacher_kind)


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("q_form", ["logits", "logprobs", "ava"])
@pytest.mark.parametrize("td_target", TD_TARGETS)
def test_td_forms_match_reference(q_form, td_target, teacher_kind):
    params = spec_params(q_form=q_form, td_target=td_target, ava_alpha=3.0, gamma=0.9, temperature=0.8,
                         prior_std=2.0, reward_kl_weight=0.7, td_weight=1.3)
    check_against_reference(params, teacher_kind, seed=1)


@pytest.mark.parametrize("reward_input", ["next_state", "state"])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_packed_rows_and_reward_input_match_reference(reward_input, teacher_kind):
    params = spec_params(reward_input=reward_input, divergence="jsd", scale_by_tau_squared=False,
                         temperature=2.0)
    check_against_reference(params, teacher_kind, seed=2, packed=True)


def test_renormalised_topk_matches_reference():
    check_against_reference(spec_params(topk_tail=False, td_target="teacher_expected"), "topk", seed=3)


def test_float32_inputs_match_float64_reference():
    logits, labels, _t_logits, ids, lps, mu, log_std, pos = make_batch(4, packed=True)
    params = spec_params(divergence="jsd")
    out = xkd_loss(logits.float(), labels, teacher=TopKSignal(ids, lps.half()), mu=mu.float(),
                   log_sigma=log_std.float(), params=params, position_ids=pos, eos_token_id=EOS)
    ref, _, _ = reference_xkd(logits, labels, teacher={"kind": "topk", "ids": ids, "logprobs": lps.half()},
                              mu=mu, log_sigma=log_std, hp=dataclasses.asdict(params),
                              position_ids=pos, eos=EOS)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-4, rtol=5e-4)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl", "tvd", "sequence"])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_gradcheck_wrt_logits_and_reward_outputs(divergence, teacher_kind):
    logits, labels, t_logits, ids, lps, mu, log_std, pos = make_batch(5, packed=True)
    signal, _ = teachers(t_logits, ids, lps)[teacher_kind]
    params = spec_params(divergence=divergence, q_form="logprobs", alpha_ce=0.5, gamma=0.95)

    def fn(z, m, s):
        return xkd_loss(z, labels, teacher=signal, mu=m, log_sigma=s, params=params,
                        position_ids=pos, eos_token_id=EOS).loss

    inputs = tuple(x.clone().requires_grad_(True) for x in (logits, mu, log_std))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_gradcheck_reward_head():
    from axolotl_xkd.losses import VariationalRewardHead

    head = VariationalRewardHead(5).double()
    torch.nn.init.normal_(head.proj.weight, std=0.3)
    hidden = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: torch.stack(head(h)), (hidden,))


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize(("divergence", "td_target"), [("forward_kl", "observed"), ("jsd", "soft"),
                                                       ("tvd", "observed"), ("forward_kl", "teacher_logprob")])
def test_term_forces_match_the_reference_gradients(divergence, td_target, teacher_kind):
    """xkd/kd_force and xkd/td_force: per response token, the norms of the gradients that alpha_kd * D and
    lambda * TD-NLL put on the logits, equal to the float64 reference's (one term differentiated at a time), through
    xkd_loss and through the chunked loss (first chunk, with its look-ahead row); a fixed target pulls with 0."""
    from axolotl_xkd.losses.chunked import chunked_xkd_loss

    params = spec_params(divergence=divergence, td_target=td_target, td_weight=0.3, alpha_kd=0.7, q_form="ava")
    logits, labels, t_logits, ids, lps, mu, log_std, _ = make_batch(3)
    signal, ref_teacher = teachers(t_logits, ids, lps)[teacher_kind]
    z = logits.clone().requires_grad_(True)
    _, terms, count = reference_xkd(z, labels, teacher=ref_teacher, mu=mu, log_sigma=log_std,
                                    hp=dataclasses.asdict(params), eos=EOS)
    want = []
    for weight, term in ((params.alpha_kd, "divergence"), (params.td_weight, "td_nll")):
        pulls = terms[term].requires_grad  # a fixed TD target's term does not depend on the logits
        grad = torch.autograd.grad(weight * terms[term], z)[0] if pulls else torch.zeros_like(z)
        want.append(grad.norm(dim=-1).sum().item())
    got = xkd_loss(logits, labels, teacher=signal, mu=mu, log_sigma=log_std, params=params, eos_token_id=EOS,
                   forces=True).forces.tolist()
    assert got[2] == count
    assert got[:2] == pytest.approx(want, rel=1e-9, abs=1e-12)
    if td_target == "teacher_logprob":
        assert got[1] == 0 and got[0] > 0
    else:
        assert got[1] > 0
    # The chunked loss measures its first chunk: with one chunk of every row, the same numbers.
    weight = torch.eye(V, dtype=torch.float64)  # logits = hidden @ I: the same logits, formed by the output layer
    chunked = chunked_xkd_loss(logits, weight, labels, teacher=signal, mu=mu, log_sigma=log_std, params=params,
                               eos_token_id=EOS, chunk_size=B * T, forces=True)
    assert chunked.forces.tolist() == pytest.approx(got, rel=1e-9, abs=1e-12)
    assert xkd_loss(logits, labels, teacher=signal, mu=mu, log_sigma=log_std, params=params,
                    eos_token_id=EOS).forces is None
