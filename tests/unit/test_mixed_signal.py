"""A mixture mixed inside the chunked loss (losses/mixed.py `MixedSignal`: each teacher's hidden states and output
layer, mixed a chunk at a time) equals the unchunked loss on the mixture formed whole (`mix`, which
tests/unit/test_mixture.py checks against the float64 reference): loss, parts and gradients, in float64; and the
weights it writes for the logs are the mixture's."""

from __future__ import annotations

import math

import pytest
import torch

from axolotl_xkd.keys import ROUTE
from axolotl_xkd.losses import xkd_loss
from axolotl_xkd.losses.chunked import chunked_xkd_loss
from axolotl_xkd.losses.mixed import MixedSignal, MixRule, log_weights, mix
from axolotl_xkd.losses.signal import DenseHiddenSignal, DenseSignal, TopKSignal
from axolotl_xkd.teachers.base import TeacherSource
from axolotl_xkd.teachers.mixture import Member, MixtureTeacherSource
from tests.support import spec_params

B, T, H, H_T, V, K = 2, 12, 6, 5, 17, 4
EXACT = {"atol": 1e-10, "rtol": 1e-9}


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt: positions 0 and 1 are not counted
    labels[1, 9:] = -100
    teacher = [(torch.randn(B, T, H_T, generator=g, dtype=torch.float64),
                torch.randn(V, H_T, generator=g, dtype=torch.float64)) for _ in range(2)]
    logp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    values, ids = logp.topk(K, -1)
    values[0, 5, -1] = -math.inf  # a hole
    values[1, 3] = -math.inf  # no distribution here (a cross-tokenizer coverage gap)
    return {"labels": labels, "teacher": teacher, "topk": TopKSignal(ids, values),
            "hidden": torch.randn(B, T, H, generator=g, dtype=torch.float64),
            "weight": torch.randn(V, H, generator=g, dtype=torch.float64),
            "mean": torch.randn(B, T, generator=g, dtype=torch.float64),
            "log_std": torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5}


ROUTE_ROWS = torch.tensor([[-1, -1] + [0] * 4 + [1] * 6, [1] * 5 + [0] * 7])  # packed rows of both teachers
NEXT = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
CASES = [("route", {}), ("weighted", {}), ("confidence", {"score": "logprob", "temperature": 0.7}),
         ("confidence", {"score": "neg_entropy", "temperature": 1.5})]


def members(x: dict, kinds: str) -> tuple:
    """The two teachers: both dense as hidden states and output layer, or the second a top-k record."""
    first = DenseHiddenSignal(*x["teacher"][0])
    return (first, DenseHiddenSignal(*x["teacher"][1]) if kinds == "dense" else x["topk"])


def whole(signal):
    return DenseSignal(signal.hidden @ signal.weight.T) if isinstance(signal, DenseHiddenSignal) else signal


def run(x: dict, teacher, params, *, chunked: bool, chunk_size: int = 5):
    leaves = {k: x[k].clone().requires_grad_(True) for k in ("hidden", "weight", "mean", "log_std")}
    common = {"teacher": teacher, "mu": leaves["mean"], "log_sigma": leaves["log_std"], "params": params}
    if chunked:
        out = chunked_xkd_loss(leaves["hidden"], leaves["weight"], x["labels"], chunk_size=chunk_size, **common)
    else:
        out = xkd_loss(leaves["hidden"] @ leaves["weight"].T, x["labels"], **common)
    return out, torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True)


@pytest.mark.parametrize("td", [{}, {"td_target": "soft", "gamma": 0.9}], ids=["fixed_target", "look_ahead"])
@pytest.mark.parametrize("kinds", ["dense", "topk"])
@pytest.mark.parametrize("mixture, kw", CASES)
def test_mixed_a_chunk_at_a_time_equals_the_whole_mixture(mixture, kw, kinds, td):
    x = inputs()
    rule = MixRule(mixture, (1.0, 3.0), V, top_k=K, **kw)
    teachers = members(x, kinds)
    log_w = log_weights([whole(m) for m in teachers], rule, shape=torch.Size((B, T)), route=ROUTE_ROWS,
                        next_ids=NEXT)
    reference = mix([whole(m) for m in teachers], log_w, top_k=K)
    seen = torch.full((B * T, 2), math.nan, dtype=torch.float64)
    lazy = MixedSignal(teachers, rule, route=ROUTE_ROWS, next_ids=NEXT, seen=seen,
                       where=torch.arange(B * T).reshape(B, T))
    assert lazy.kind == reference.kind
    params = spec_params(alpha_ce=0.3, temperature=1.3, **td)
    (ref, ref_grads), (got, grads) = run(x, reference, params, chunked=False), run(x, lazy, params, chunked=True)
    for field in ref._fields:
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), **EXACT)
    for ref_grad, grad in zip(ref_grads, grads):
        torch.testing.assert_close(grad, ref_grad, **EXACT)
    # Every position the loss formed holds its weights W_i (the logged shares); the counted ones at least.
    formed = ~seen.isnan().any(-1)
    counted = torch.zeros(B, T, dtype=torch.bool)
    counted[:, :-1] = x["labels"][:, 1:] != -100  # position i predicts label i + 1
    assert formed[counted.reshape(-1)].all()
    torch.testing.assert_close(seen[formed], log_w.exp().reshape(B * T, 2)[formed], **EXACT)


def test_route_forms_each_position_through_its_own_teacher_only(monkeypatch):
    """Under route each teacher's output layer sees the rows routed to it, not the others'."""
    x = inputs()
    teachers = members(x, "dense")
    shapes = []
    original = DenseHiddenSignal._logits

    def counting(self, hidden):
        shapes.append(hidden.shape[0])
        return original(self, hidden)

    monkeypatch.setattr(DenseHiddenSignal, "_logits", counting)
    MixedSignal(teachers, MixRule("route", (1.0, 1.0), V), route=ROUTE_ROWS).flat().formed()
    assert sorted(shapes) == sorted([int((ROUTE_ROWS == 0).sum()), int((ROUTE_ROWS == 1).sum())])


class HiddenRows(TeacherSource):
    """A fusable teacher of fixed hidden states and output layer, answering for the rows it is asked about (a stand-in
    for the teacher model: the test is of the mixture source)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        self.hidden, self.weight, self.asked = hidden, weight, []

    @property
    def fusable(self) -> bool:
        return True

    def rows(self, batch) -> list[int]:
        rows = [int(torch.nonzero((row == IDS).all(-1))[0]) for row in batch["input_ids"]]
        self.asked.append(rows)
        return rows

    def get_hidden_signal(self, batch):
        return DenseHiddenSignal(self.hidden[self.rows(batch)], self.weight)

    def get_signal(self, batch):
        return DenseSignal(self.hidden[self.rows(batch)] @ self.weight.T)


IDS = torch.arange(B * T).reshape(B, T) % V


@pytest.mark.parametrize("mixture", ["route", "weighted", "confidence"])
def test_the_source_hands_the_fused_loss_what_its_unfused_signal_gives(mixture):
    """MixtureTeacherSource.get_hidden_signal (the teachers unmixed) through the chunked loss equals get_signal (the
    mixture formed whole) through the unchunked loss, and both log the same shares and weights."""
    x = inputs()
    route = torch.tensor([[-1, -1] + [0] * 10, [0] * 12]) if mixture == "route" else None
    batch = {"input_ids": IDS, "labels": x["labels"], **({ROUTE: route} if route is not None else {})}
    params = spec_params(alpha_ce=0.3)
    results = []
    for fused in (False, True):
        teachers = [HiddenRows(*x["teacher"][0]), HiddenRows(*x["teacher"][1])]
        source = MixtureTeacherSource([Member("a", teachers[0]), Member("b", teachers[1], 2.0)], mixture=mixture,
                                      vocab_size=V, top_k=K)
        signal = source.get_hidden_signal(dict(batch)) if fused else source.get_signal(dict(batch))
        out, grads = run(x, signal, params, chunked=fused)
        results.append((out, grads, source.metrics(), [t.asked for t in teachers]))
    (ref, ref_grads, ref_logs, ref_asked), (got, grads, logs, asked) = results
    torch.testing.assert_close(got.loss, ref.loss, **EXACT)
    for ref_grad, grad in zip(ref_grads, grads):
        torch.testing.assert_close(grad, ref_grad, **EXACT)
    assert logs == pytest.approx(ref_logs, abs=1e-12) and asked == ref_asked
    if mixture == "route":  # the second teacher has no rows: asked nothing, serves nothing
        assert asked[1] == [] and logs["teacher/b/share"] == 0.0 and logs["teacher/a/share"] == 1.0
