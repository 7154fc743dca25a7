"""Regression tests for the bugs an independent audit of the loss found; each docstring names its bug."""

from __future__ import annotations

import math

import pytest
import torch

from axolotl_xkd.losses import DenseSignal, TopKSignal, XKDHyperparams, xkd_loss
from axolotl_xkd.losses.chunked import chunked_xkd_loss
from axolotl_xkd.losses.signal import DenseHiddenSignal
from tests.support import spec_params

H, H_T, V = 3, 4, 7
PATHS = ("unchunked", "autograd", "fused")


def _leaves(batch: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(batch, length, H, generator=g, dtype=torch.float64).requires_grad_(True),
        "weight": torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(True),
        "mean": torch.randn(batch, length, generator=g, dtype=torch.float64).requires_grad_(True),
        "log_std": (0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)).requires_grad_(True),
    }


def _loss(path: str, leaves: dict, labels: torch.Tensor, teacher, params: XKDHyperparams, **kwargs):
    """The loss by one path: xkd_loss on full logits, or chunked_xkd_loss with autograd or hand-written gradients."""
    common = {"mu": leaves["mean"], "log_sigma": leaves["log_std"], "params": params}
    if path == "unchunked":
        if isinstance(teacher, DenseHiddenSignal):
            teacher = DenseSignal(teacher.hidden @ teacher.weight.T)
        return xkd_loss(leaves["hidden"] @ leaves["weight"].T, labels, teacher=teacher, **common, **kwargs)
    return chunked_xkd_loss(leaves["hidden"], leaves["weight"], labels, teacher=teacher, chunk_size=2, mode=path,
                            **common, **kwargs)


@pytest.mark.parametrize("signal", ["dense", "dense_hidden"])
@pytest.mark.parametrize("path", PATHS)
def test_nan_teacher_at_a_position_without_action_leaves_gradients_finite(path, signal):
    """Bug: fused forward_kl with a dense teacher turned a NaN teacher row at a position with no action (here the
    row end) into NaN gradients for all of W and that hidden row (NaN * 0 in the hand-written gradient), while the
    loss stayed finite and the other paths gave finite gradients. The audit's repro, on every path."""
    labels = torch.tensor([[-100, 4, 5, 6, -100]])
    g = torch.Generator().manual_seed(1)
    teacher_hidden = torch.randn(1, 5, H_T, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(V, H_T, generator=g, dtype=torch.float64)
    params = spec_params(td_weight=0.0, reward_kl_weight=0.0)
    grads = []
    for poisoned in (False, True):
        hidden = teacher_hidden.clone()
        if poisoned:
            hidden[0, 4] = math.nan
        teacher = DenseHiddenSignal(hidden, teacher_weight)
        if signal == "dense":
            teacher = DenseSignal(hidden @ teacher_weight.T)
        leaves = _leaves(1, 5)
        out = _loss(path, leaves, labels, teacher, params)
        assert torch.isfinite(out.loss)
        grads.append(torch.autograd.grad(out.loss, [leaves["hidden"], leaves["weight"]]))
    for clean, poisoned in zip(*grads):
        assert torch.isfinite(poisoned).all()
        torch.testing.assert_close(poisoned, clean, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["no_rows", "no_positions"])
@pytest.mark.parametrize("path", PATHS)
def test_empty_batch_gives_zero_with_finite_gradients(path, shape):
    """Bug: chunked_xkd_loss with B = 0 or T = 0 raised "cannot reshape tensor of 0 elements" where xkd_loss
    returned 0. Every path now returns 0 with finite (zero) gradients."""
    leaves = _leaves(*shape)
    labels = torch.full(shape, 4)
    teacher = DenseHiddenSignal(torch.randn(*shape, H_T, dtype=torch.float64), torch.randn(V, H_T, dtype=torch.float64))
    params = spec_params(alpha_ce=0.5)
    out = _loss(path, leaves, labels, teacher, params, position_ids=torch.zeros(shape, dtype=torch.long))
    assert out.loss.item() == 0.0 and out.num_tokens.item() == 0
    for grad in torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True):
        assert grad is None or (torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0)


@pytest.mark.parametrize("signal", ["dense", "dense_hidden"])
@pytest.mark.parametrize("path", PATHS)
def test_dense_teacher_with_a_wider_vocabulary_raises_on_every_path(path, signal):
    """Bug: a dense teacher over more tokens than the student made xkd_loss raise while chunked_xkd_loss silently
    cut and renormalised it. Both raise now, naming the fix (vocab_size), since which extra entries are padding
    only the caller knows; cutting on the caller's vocab_size still works (test_chunked)."""
    leaves = _leaves(1, 4)
    wider = torch.randn(V + 2, H_T, dtype=torch.float64)
    hidden = torch.randn(1, 4, H_T, dtype=torch.float64)
    teacher = DenseHiddenSignal(hidden, wider) if signal == "dense_hidden" else DenseSignal(hidden @ wider.T)
    with pytest.raises(ValueError, match=rf"{V + 2} .*student's vocabulary has {V}.*vocab_size"):
        _loss(path, leaves, torch.tensor([[-100, 4, 5, 6]]), teacher, spec_params())


@pytest.mark.parametrize("kind", ["dense", "dense_hidden", "topk"])
@pytest.mark.parametrize("path", PATHS)
def test_teacher_of_other_positions_raises_on_every_path(path, kind):
    """Both paths flatten (B, T) through one function, which checks the teacher's positions against the labels':
    a (T, B) teacher used to pass whenever B * T matched, pairing z_i with another position's distribution."""
    leaves = _leaves(2, 3)
    hidden = torch.randn(3, 2, H_T, dtype=torch.float64)
    weight = torch.randn(V, H_T, dtype=torch.float64)
    teacher = {"dense": DenseSignal(hidden @ weight.T), "dense_hidden": DenseHiddenSignal(hidden, weight),
               "topk": TopKSignal(torch.zeros(3, 2, 2, dtype=torch.long), torch.full((3, 2, 2), -1.0))}[kind]
    with pytest.raises(ValueError, match=r"not aligned with the student's \(B, T\) = \(2, 3\)"):
        _loss(path, leaves, torch.tensor([[-100, 4, 5], [4, 5, 6]]), teacher, spec_params())


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("q_form", "logit", r"q_form='logit' is not one of .*xkd\.q_form"),
        ("td_target", "expected", r"td_target='expected' is not one of .*xkd\.td_target"),
        ("reward_input", "hidden", r"reward_input='hidden' is not one of .*xkd\.reward_input"),
        ("divergence", "kl", r"divergence='kl' is not one of .*xkd\.divergence"),
        ("temperature", 0.0, r"temperature=0\.0 is outside \(0, inf\) \(xkd\.temperature\)"),
        ("temperature", math.nan, r"temperature=nan is outside"),
        ("beta", 1.5, r"beta=1\.5 is outside \[0, 1\] \(xkd\.beta\)"),
        ("beta", -0.1, r"beta=-0\.1 is outside \[0, 1\]"),
        ("prior_std", 0.0, r"prior_std=0\.0 is outside \(0, inf\) \(xkd\.prior_std\)"),
        ("gamma", 1.1, r"gamma=1\.1 is outside \[0, 1\]"),
        ("skew_alpha", 1.0, r"skew_alpha=1\.0 is outside \[0, 1\)"),
        ("ava_alpha", 0.0, r"ava_alpha=0\.0 is outside"),
        ("td_weight", -1.0, r"td_weight=-1\.0 is outside"),
    ],
)
def test_hyperparameters_are_validated_when_the_api_is_called_directly(field, value, words):
    """Bug: the loss API accepted what the config rejects: an unknown q_form computed the logprobs form in fused
    mode, an unknown td_target / reward_input silently defaulted, tau = 0 gave ZeroDivisionError or NaN, beta
    outside [0, 1] negative divergences, prior_std = 0 "math domain error". XKDHyperparams now checks them once,
    in the config's words."""
    with pytest.raises(ValueError, match=words):
        spec_params(**{field: value})


@pytest.mark.parametrize(
    ("ids", "logprobs", "words"),
    [
        ([[1, 2, 3]], [[-1.0, math.nan, -3.0]], "NaN log-prob"),
        ([[1, 2, 3]], [[-1.0, math.inf, -3.0]], r"\+inf log-prob"),
        ([[1, 2, 3]], [[-0.1, -0.2, -0.3]], "summing above 1"),
        ([[1, 2, 1]], [[-1.0, -2.0, -3.0]], "same token id twice"),
        ([[1, 2, V]], [[-1.0, -2.0, -3.0]], "outside the vocabulary"),
        ([[1, 2, 3]], [[-1.0, 0.5, -math.inf]], "log-prob above 0"),
    ],
)
def test_topk_signal_validate_rejects_what_the_loss_would_misread(ids, logprobs, words):
    """Bug: TopKSignal read a NaN or +inf log-prob as padding, renormalised log-probs summing above 1 and accepted
    duplicate ids (student categories then summed to 1.32). The loss trusts its input (docstring); `validate` is
    the cheap check the store and server paths call."""
    with pytest.raises(ValueError, match=f"position 0 .*{words}"):
        TopKSignal(torch.tensor(ids), torch.tensor(logprobs)).validate(vocab_size=V)


def test_topk_signal_validate_accepts_padding_and_float16_rounding():
    """Padded slots (-inf, any id, even one repeating a real id) and a sum a little above 1 are valid records."""
    ids = torch.tensor([[[1, 2, 1], [3, 0, 0]]])
    logprobs = torch.tensor([[[math.log(0.6), math.log(0.405), -math.inf], [-0.5, -math.inf, -math.inf]]])
    TopKSignal(ids, logprobs).validate(vocab_size=V)
    TopKSignal(ids[:, :0], logprobs[:, :0]).validate()


def test_chunked_loss_refuses_second_derivatives():
    """Bug: the chunked autograd Function stores gradients computed in its forward pass, so create_graph=True
    silently gave wrong second derivatives (gradgradcheck failed where the unchunked path passes). It raises."""
    leaves = _leaves(1, 5)
    teacher = DenseHiddenSignal(torch.randn(1, 5, H_T, dtype=torch.float64), torch.randn(V, H_T, dtype=torch.float64))
    out = _loss("fused", leaves, torch.tensor([[-100, 4, 5, 6, 2]]), teacher, spec_params())
    with pytest.raises(RuntimeError, match="create_graph=True is not supported"):
        torch.autograd.grad(out.loss, [leaves["hidden"]], create_graph=True)
