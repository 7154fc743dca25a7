"""Identities the X-KD loss must satisfy (XKD_METHOD.md section 2), and a hand-derived golden value."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from axolotl_xkd.losses import DenseSignal, TopKSignal, xkd_loss
from axolotl_xkd.losses.divergence import forward_kl, generalized_jsd
from axolotl_xkd.losses.positions import nonterminal_next, shift_targets
from tests.support import spec_params


def random_case(seed=0, B=3, T=6, V=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    teacher = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    mu, log_std = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    return logits, teacher, labels, mu, log_std


def test_losses_import_without_training_stack():
    code = ("import sys, axolotl_xkd.losses; "
            "bad = {'axolotl', 'transformers', 'deepspeed'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reward_weights_zero_gives_plain_distillation_exactly():
    logits, teacher, labels, mu, log_std = random_case()
    params = spec_params(reward_kl_weight=0.0, td_weight=0.0)
    out = xkd_loss(logits, labels, teacher=DenseSignal(teacher), mu=mu, log_sigma=log_std,
                   params=params)
    targets = shift_targets(labels, None)
    per_token = forward_kl(torch.log_softmax(logits, -1), torch.log_softmax(teacher, -1))
    plain = torch.where(targets != -100, per_token, 0.0).sum()
    assert torch.equal(out.loss, plain)
    kl_div = F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(teacher, -1), log_target=True,
                      reduction="none").sum(-1)
    torch.testing.assert_close(out.loss, kl_div[targets != -100].sum())
    without_head = xkd_loss(logits, labels, teacher=DenseSignal(teacher), mu=None, log_sigma=None,
                            params=params)
    assert torch.equal(without_head.loss, out.loss)


@pytest.mark.parametrize("as_topk", [False, True])
def test_forward_kl_against_one_hot_teacher_is_cross_entropy(as_topk):
    logits, _, labels, _, _ = random_case(1)
    targets = shift_targets(labels, None)
    safe = targets.clamp(min=0)
    if as_topk:
        teacher = TopKSignal(safe.unsqueeze(-1), torch.zeros_like(safe, dtype=torch.float32).unsqueeze(-1))
    else:
        one_hot = torch.full_like(logits, -math.inf).scatter(-1, safe.unsqueeze(-1), 0.0)
        teacher = DenseSignal(one_hot)
    params = spec_params(reward_kl_weight=0.0, td_weight=0.0, temperature=1.0)
    out = xkd_loss(logits, labels, teacher=teacher, mu=None, log_sigma=None, params=params)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(out.loss, ce)


def test_jsd_ends_are_trl_forward_and_reverse_kl():
    logits, teacher, *_ = random_case(2)
    s, t = torch.log_softmax(logits, -1), torch.log_softmax(teacher, -1)
    fwd = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # KL(teacher || student)
    rev = F.kl_div(t, s, log_target=True, reduction="none").sum(-1)  # KL(student || teacher)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), fwd)
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), rev)
    # Approaching the ends, the mixture form goes to 0 (both KLs to m vanish), as in TRL's docs.
    assert generalized_jsd(s, t, beta=1e-6).abs().max() < 1e-4


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_identical_distributions_give_zero_divergence(divergence):
    logits, _, labels, _, _ = random_case(3)
    params = spec_params(divergence=divergence, reward_kl_weight=0.0, td_weight=0.0)
    out = xkd_loss(logits, labels, teacher=DenseSignal(logits.clone()), mu=None, log_sigma=None,
                   params=params)
    assert abs(float(out.loss)) < 1e-5


def test_all_masked_gives_zero_with_finite_gradients():
    logits, teacher, labels, mu, log_std = random_case(4)
    labels[:] = -100
    leaves = [x.clone().requires_grad_(True) for x in (logits, mu, log_std)]
    ids = torch.zeros(3, 6, 2, dtype=torch.long)
    lps = torch.full((3, 6, 2), -math.inf)
    for teacher_signal in (DenseSignal(teacher), TopKSignal(ids, lps)):
        out = xkd_loss(leaves[0], labels, teacher=teacher_signal, mu=leaves[1], log_sigma=leaves[2],
                       params=spec_params(divergence="jsd", td_target="teacher_expected"))
        assert float(out.loss.detach()) == 0.0 and int(out.num_tokens) == 0
        for grad in torch.autograd.grad(out.loss, leaves):
            assert torch.isfinite(grad).all() and grad.abs().sum() == 0


def test_golden_value_by_hand():
    """Uniform student over V=4, one-hot teacher, mu=0, sigma=1, Q=logits=0: every response token costs
    log 4 (forward KL) + 0 (KL to N(0,1)) + 0.5 log(2 pi) (TD = 0 under N(0,1))."""
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 0, 1]])
    teacher = TopKSignal(torch.tensor([[[1], [2], [3], [0]], [[0], [0], [1], [0]]]), torch.zeros(2, 4, 1))
    out = xkd_loss(logits, labels, teacher=teacher, mu=torch.zeros(2, 4), log_sigma=torch.zeros(2, 4),
                   params=spec_params(q_form="logits"))
    assert int(out.num_tokens) == 5
    torch.testing.assert_close(out.loss, torch.tensor(5 * (math.log(4) + 0.5 * math.log(2 * math.pi))))


def test_td_terminals_at_eos_masks_and_packed_boundaries():
    labels = torch.tensor([[-100, 5, 6, 2, 7, 8, -100, 9, 4]])
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    targets = shift_targets(labels, position_ids)
    # position 4 would predict u_5 = 8, the first token of the next packed sequence: no action there
    assert targets.tolist() == [[5, 6, 2, 7, -100, -100, 9, 4, -100]]
    nonterminal = nonterminal_next(targets, eos_token_id=2)[targets != -100]
    # over the actions 5, 6, 2, 7, 9, 4: terminal after EOS (2), at the end of segment one (7, whose next
    # token belongs to the next sequence) and at the end of the row (4)
    assert nonterminal.tolist() == [True, True, False, False, True, False]


def test_packed_loss_equals_sum_of_separate_sequences():
    """No term pairs a token with the next sequence's token: a packed row's loss and gradients split
    exactly into the losses of its sequences computed alone."""
    g = torch.Generator().manual_seed(7)
    V = 7
    lengths = [4, 3, 5]
    seqs = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    labels_each = [s.clone() for s in seqs]
    for lab in labels_each:
        lab[0] = -100
    logits = torch.randn(1, sum(lengths), V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, sum(lengths), V, generator=g, dtype=torch.float64)
    mu = torch.randn(1, sum(lengths), generator=g, dtype=torch.float64, requires_grad=True)
    log_std = torch.randn(1, sum(lengths), generator=g, dtype=torch.float64, requires_grad=True)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    params = spec_params(divergence="jsd", q_form="logits", td_target="teacher_expected", gamma=0.9)
    packed = xkd_loss(logits, torch.cat(labels_each).unsqueeze(0), teacher=DenseSignal(teacher), mu=mu,
                      log_sigma=log_std, params=params, position_ids=position_ids)
    separate, start = 0.0, 0
    for n, lab in zip(lengths, labels_each):
        sl = slice(start, start + n)
        separate = separate + xkd_loss(logits[:, sl], lab.unsqueeze(0), teacher=DenseSignal(teacher[:, sl]),
                                       mu=mu[:, sl], log_sigma=log_std[:, sl], params=params).loss
        start += n
    torch.testing.assert_close(packed.loss, separate, atol=1e-12, rtol=1e-12)
    # Gradient of the first sequence's part never reaches the second sequence's positions.
    first = xkd_loss(logits, torch.cat([labels_each[0], torch.full((8,), -100)]).unsqueeze(0),
                     teacher=DenseSignal(teacher), mu=mu, log_sigma=log_std, params=params,
                     position_ids=position_ids).loss
    grad_logits, grad_mu = torch.autograd.grad(first, (logits, mu))
    assert grad_logits[0, 4:].abs().sum() == 0 and grad_mu[0, 4:].abs().sum() == 0
