"""Mixed precision (docs/precision.md): the loss with bf16 inputs against float32 on the same values, on every path,
divergence and teacher kind, a bf16 teacher with a float32 student and the reverse; gradient accumulation in bf16;
and no divergence below 0 on near-equal distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from axolotl_xkd.losses import DIVERGENCES, DenseSignal, TopKSignal, XKDHyperparams, xkd_loss
from axolotl_xkd.losses.categories import paired_categories
from axolotl_xkd.losses.chunked import chunked_xkd_loss
from axolotl_xkd.losses.divergence import REGISTRY, divergence
from axolotl_xkd.losses.signal import DenseHiddenSignal
from axolotl_xkd.losses.td import gaussian_kl_to_prior

B, T, H, V, K = 2, 24, 32, 128, 8
BF16, FP32 = torch.bfloat16, torch.float32
PATHS = ("unchunked", "autograd", "fused")
# The documented bounds (docs/precision.md): relative error of the loss (bf16's unit roundoff) and norm-wise relative
# error of each gradient. Measured here: 2.9e-4 and 1.3e-2; with the loss computed in bf16 (no upcast) 4.1e-3 and 7.3e-2.
LOSS_RTOL = 2**-9
GRAD_RTOL = 2**-5
# (teacher source, student dtype, teacher dtype): the model teacher is dense, in its own dtype; the precomputed store
# and the server hand the loss top-k log-probs in float32 (the store's rounded to float16 first), whatever the
# teacher's dtype was.
CASES = [("model", BF16, BF16), ("model", BF16, FP32), ("model", FP32, BF16), ("precomputed", BF16, FP32),
         ("server", BF16, FP32)]


def _inputs(seed: int = 0) -> dict[str, Tensor]:
    """Student and teacher hidden states and output layers (logits up to |z| ~ 12), labels with a prompt, and the
    reward head's outputs; all float32."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, V, (B, T), generator=g)
    labels[:, :4] = -100
    weight = torch.randn(V, H, generator=g) * 3 / math.sqrt(H)
    return {
        "hidden": torch.randn(B, T, H, generator=g),
        "weight": weight,
        "teacher_hidden": torch.randn(B, T, H, generator=g),
        "teacher_weight": weight + torch.randn(V, H, generator=g) * 2 / math.sqrt(H),
        "labels": labels,
        "mu": 0.1 * torch.randn(B, T, generator=g),
        "log_sigma": 0.1 * torch.randn(B, T, generator=g),
    }


def _topk(x: dict[str, Tensor], source: str, teacher_dtype: torch.dtype) -> TopKSignal:
    """The teacher's top-k as the store (float16 log-probs, read back as float32) or the server (float32) gives it."""
    logits = x["teacher_hidden"].to(teacher_dtype) @ x["teacher_weight"].to(teacher_dtype).T
    top = torch.log_softmax(logits.float(), dim=-1).topk(K, dim=-1)
    logprobs = top.values.half().float() if source == "precomputed" else top.values
    return TopKSignal(top.indices, logprobs)


def _loss_and_grads(x: dict[str, Tensor], path: str, params: XKDHyperparams, teacher, student_dtype: torch.dtype,
                    chunk_size: int = 16) -> tuple[Tensor, list[Tensor]]:
    """The loss (float64 copy) and its gradients for the student's hidden states, output layer and the reward head's
    outputs, with the student in `student_dtype` (the unchunked path gets the logits its output layer forms)."""
    leaves = [x["hidden"].to(student_dtype).requires_grad_(True), x["weight"].to(student_dtype).requires_grad_(True),
              x["mu"].clone().requires_grad_(True), x["log_sigma"].clone().requires_grad_(True)]
    hidden, weight, mu, log_sigma = leaves
    common = {"teacher": teacher, "mu": mu, "log_sigma": log_sigma, "params": params}
    if path == "unchunked":
        if isinstance(teacher, DenseHiddenSignal):
            common["teacher"] = DenseSignal(teacher.hidden @ teacher.weight.T)
        out = xkd_loss(hidden @ weight.T, x["labels"], **common)
    else:
        out = chunked_xkd_loss(hidden, weight, x["labels"], chunk_size=chunk_size, mode=path, **common)
    return out.loss.detach().double(), [g.double() for g in torch.autograd.grad(out.loss, leaves)]


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("source,student_dtype,teacher_dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("path", PATHS)
def test_bf16_matches_float32_on_the_same_values(path, name, source, student_dtype, teacher_dtype):
    """bf16 inputs against the same values in float32: the loss within LOSS_RTOL and each gradient within GRAD_RTOL
    (norm-wise). What differs is the rounding of the logits the output layers form in bf16; the loss itself runs in
    float32."""
    x = _inputs()
    exact = {key: value.to(student_dtype).float() if key in ("hidden", "weight") else value for key, value in x.items()}
    exact["teacher_hidden"], exact["teacher_weight"] = (x[k].to(teacher_dtype).float()
                                                         for k in ("teacher_hidden", "teacher_weight"))
    params = XKDHyperparams(divergence=name)
    if source == "model":
        teacher = DenseHiddenSignal(x["teacher_hidden"].to(teacher_dtype), x["teacher_weight"].to(teacher_dtype))
        reference_teacher = DenseHiddenSignal(exact["teacher_hidden"], exact["teacher_weight"])
    else:
        teacher = reference_teacher = _topk(x, source, teacher_dtype)
    loss, grads = _loss_and_grads(x, path, params, teacher, student_dtype)
    reference, reference_grads = _loss_and_grads(exact, path, params, reference_teacher, FP32)
    assert torch.isfinite(loss) and abs(loss - reference) <= LOSS_RTOL * abs(reference)
    for grad, reference_grad in zip(grads, reference_grads):
        assert torch.isfinite(grad).all() and _relative(grad, reference_grad) <= GRAD_RTOL


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("path", PATHS)
def test_bf16_gradient_accumulation_equals_one_micro_batch(path, name):
    """Two bf16 micro-batches, each loss divided by the step's token count and backpropagated into the same bf16
    leaves (as the trainer accumulates), give the gradient of the one large micro-batch within GRAD_RTOL."""
    x = _inputs(1)
    teacher = DenseHiddenSignal(x["teacher_hidden"].to(BF16), x["teacher_weight"].to(BF16))
    params = XKDHyperparams(divergence=name)
    hidden, weight = x["hidden"].to(BF16).requires_grad_(True), x["weight"].to(BF16).requires_grad_(True)
    count = (x["labels"][:, 1:] != -100).sum()

    def loss(rows: slice) -> Tensor:
        common = {"mu": x["mu"][rows], "log_sigma": x["log_sigma"][rows], "params": params}
        part = DenseHiddenSignal(teacher.hidden[rows], teacher.weight)
        if path == "unchunked":
            out = xkd_loss(hidden[rows] @ weight.T, x["labels"][rows], teacher=DenseSignal(part.hidden @ part.weight.T),
                           **common)
        else:
            out = chunked_xkd_loss(hidden[rows], weight, x["labels"][rows], teacher=part, chunk_size=16, mode=path,
                                   **common)
        return out.loss / count

    whole = [g.double() for g in torch.autograd.grad(loss(slice(0, B)), [hidden, weight])]
    for rows in (slice(0, 1), slice(1, 2)):
        loss(rows).backward()
    for accumulated, one in zip((hidden.grad, weight.grad), whole):
        assert _relative(accumulated.double(), one) <= GRAD_RTOL


def _near_equal(vocab: int, scale: float, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """bf16 student logits (64, vocab) and a teacher's: the same values (noise 0), or float32 ones off by `noise`."""
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(64, vocab, generator=g)).to(BF16)
    if noise == 0:
        return student, student.clone()
    return student, student.float() + noise * torch.randn(64, vocab, generator=g)


ADVERSARIAL = [(vocab, scale, noise) for vocab in (32, 1024) for scale in (0.1, 3.0, 12.0) for noise in (0.0, 1e-6, 1e-3)]


@pytest.mark.parametrize("vocab,scale,noise", ADVERSARIAL)
def test_no_divergence_is_negative_on_near_equal_distributions(vocab, scale, noise):
    """Bug: KL-type divergences of near-equal distributions came out a few 1e-7 below 0 (JSD included: its mixture's
    logaddexp and the tail category round apart from the log_softmax), per token, on the dense and the top-k
    categories. Every divergence, per token, of a bf16 student and an equal or nearly equal teacher is now >= 0."""
    student, teacher_logits = _near_equal(vocab, scale, noise, seed=vocab + int(scale * 10))
    top = torch.log_softmax(teacher_logits.float(), dim=-1).topk(K, dim=-1)
    student_logprobs = torch.log_softmax(student.float(), dim=-1)
    for teacher in (DenseSignal(teacher_logits), TopKSignal(top.indices, top.values)):
        s_cat, t_cat = paired_categories(student_logprobs, teacher, temperature=1.0, topk_tail=True)
        for name in REGISTRY:
            per_token = divergence(s_cat, t_cat, name=name, beta=0.5, skew_alpha=0.1)
            assert (per_token >= 0).all(), (name, type(teacher).__name__, per_token.min().item())


@pytest.mark.parametrize("vocab,scale,noise", ADVERSARIAL)
def test_fused_forward_kl_is_not_negative_per_token(vocab, scale, noise):
    """Bug: the hand-written forward KL of a dense teacher (fused.py forms its own value, not through kl) came out
    down to -1e-6 for near-equal rows. Each row, alone in its batch so that the logged sum is its D_i, is now >= 0."""
    student, teacher_logits = _near_equal(vocab, scale, noise, seed=vocab + int(scale * 10))
    identity = torch.eye(vocab, dtype=BF16)  # hidden @ identity^T: the student's logits, exactly
    params = XKDHyperparams(divergence="forward_kl", td_weight=0.0, reward_kl_weight=0.0)
    for row in range(64):
        # Two positions: position 0 predicts label 1, the one counted token.
        out = chunked_xkd_loss(student[row].expand(2, vocab)[None], identity, torch.tensor([[-100, 1]]),
                               teacher=DenseSignal(teacher_logits[row].expand(2, vocab)[None]), mu=None,
                               log_sigma=None, params=params, mode="fused")
        assert out.num_tokens.item() == 1 and out.divergence.item() >= 0.0


def test_reward_kl_to_the_prior_is_not_negative_near_the_prior():
    """Bug: KL(N(mu, sigma^2) || N(0, 1)) as 0.5 (sigma^2 + mu^2 - 1) - log sigma came out -3e-8 in float32 for
    sigma within 1e-3 of 1. The expm1 form keeps it >= 0 (and equal to the direct form in float64)."""
    log_sigma = torch.linspace(-1e-3, 1e-3, 2001)
    assert (gaussian_kl_to_prior(torch.zeros_like(log_sigma), log_sigma) >= 0).all()
    mu, log_sigma = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    direct = 0.5 * (torch.exp(2 * log_sigma) / 4 + mu.square() / 4 - 1) - log_sigma + math.log(2)
    torch.testing.assert_close(gaussian_kl_to_prior(mu, log_sigma, prior_std=2.0), direct)


@pytest.mark.parametrize("overrides,expected", [
    ({}, {"use_cpu": True}),
    ({"bf16": False}, None),
    ({"device": "cuda:0"}, None),
    ({"deepspeed": "zero2.json"}, None),
    ({"xkd": None}, None),
], ids=["cpu_bf16", "float32", "gpu", "deepspeed", "no_xkd"])
def test_use_cpu_only_for_bf16_without_an_accelerator(overrides, expected):
    """The plugin asks for use_cpu (which transformers needs to train bf16 without an accelerator) only for an X-KD
    run with bf16 where Axolotl found no accelerator, and never under DeepSpeed (use_cpu would switch it off)."""
    from axolotl.utils.dict import DictDefault

    from axolotl_xkd.plugin import XKDPlugin

    cfg = DictDefault({"xkd": {"teacher": {"source": "model", "path": "t"}}, "bf16": True, "device": "cpu",
                       **overrides})
    assert XKDPlugin().get_training_args(cfg) == expected
