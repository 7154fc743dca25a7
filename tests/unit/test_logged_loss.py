"""What an X-KD run logs as `loss` and `ppl`: the student's objective when the reward head is apart from the student
(its gradient untouched), and a perplexity only of a cross-entropy. End to end: tests/e2e/test_defaults.py."""

from __future__ import annotations

import pytest
import torch

from axolotl_xkd.losses.xkd import XKDHyperparams
from axolotl_xkd.trainer import XKDSetup, _ShownAs


def xkd_setup(detach_backbone: bool = True, **params) -> XKDSetup:
    return XKDSetup(XKDHyperparams(**params), teacher=None, reward_head=None, detach_backbone=detach_backbone,
                    eos_token_id=None, vocab_size=8)


def test_shown_value_with_the_whole_gradient():
    """The Trainer logs the value and differentiates the whole objective: the gradient is the one without it."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    whole = (x**2).sum() + x.sum().exp()
    student = (x**2).sum().detach()
    shown = _ShownAs.apply(whole, student) / 3
    assert torch.equal(shown.detach(), student / 3)
    (grad,) = torch.autograd.grad(shown, x)
    (expected,) = torch.autograd.grad(((x**2).sum() + x.sum().exp()) / 3, x)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize(
    ("settings", "apart"),
    [({"td_target": "teacher_logprob"}, True), ({"td_target": "teacher_logprob", "detach_backbone": False}, False),
     ({"td_target": "observed"}, False), ({"td_target": "soft"}, False)],
)
def test_head_apart_only_when_no_reward_term_reaches_the_student(settings, apart):
    assert xkd_setup(**settings).head_apart is apart


@pytest.mark.parametrize(
    ("settings", "metric"),
    [({}, None), ({"alpha_ce": 0.5}, "ce"), ({"divergence": "sequence"}, "distill"),
     ({"divergence": "sequence", "temperature": 2.0}, None), ({"divergence": "sequence", "alpha_ce": 1.0}, "ce")],
)
def test_perplexity_only_of_a_cross_entropy(settings, metric):
    """ppl = exp(xkd/<metric>); a divergence (forward KL by default) or SeqKD at another temperature has none."""
    assert xkd_setup(**settings).ce_metric == metric
