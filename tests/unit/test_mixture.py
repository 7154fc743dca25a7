"""Several teachers mixed into one signal (losses/mixed.py, teachers/mixture.py) against the float64,
one-position-at-a-time reference written from docs/teachers.md#many-teachers (tests/reference.py `mixture_reference`)."""

from __future__ import annotations

import math

import pytest
import torch

from axolotl_xkd.keys import ROUTE
from axolotl_xkd.losses.mixed import MixRule, log_weights, mix
from axolotl_xkd.losses.signal import DenseSignal, TopKSignal
from axolotl_xkd.teachers.base import TeacherSource
from axolotl_xkd.teachers.mixture import Member, MixtureTeacherSource
from tests.reference import mixture_reference

B, T, V = 2, 5, 11


def dense(seed: int) -> torch.Tensor:
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def topk(seed: int, k: int, *, empty: tuple[int, int] | None = None, holes: int = 0) -> tuple[torch.Tensor, ...]:
    """A top-k record of a random distribution: its k most likely ids, `holes` slots emptied, one position empty."""
    logp = torch.log_softmax(dense(seed), -1)
    values, ids = logp.topk(k, -1)
    if holes:
        values[..., -holes:] = -math.inf
    if empty is not None:
        values[empty] = -math.inf
    return ids, values


def as_teacher(signal) -> dict:
    if isinstance(signal, DenseSignal):
        return {"dense": signal.logits}
    return {"ids": signal.token_ids, "logprobs": signal.logprobs}


def module_mixture(signals, mixture, weights, *, route=None, next_ids=None, **kw):
    rule = MixRule(mixture, tuple(weights), V, top_k=4, **kw)
    log_w = log_weights(signals, rule, shape=torch.Size((B, T)), route=route, next_ids=next_ids)
    return mix(signals, log_w, top_k=4), log_w


def assert_matches(out, log_w, reference):
    for (b, i), (mixed, w) in reference.items():
        assert torch.allclose(log_w[b, i].exp(), torch.tensor(w, dtype=torch.float64), atol=1e-12), (b, i)
        if isinstance(out, DenseSignal):
            got = dict(enumerate(torch.softmax(out.logits[b, i], -1).tolist()))
            assert torch.allclose(out.logits[b, i].logsumexp(-1), torch.zeros((), dtype=torch.float64), atol=1e-12)
        else:
            got = {int(u): math.exp(float(lp)) for u, lp in zip(out.token_ids[b, i], out.logprobs[b, i])
                   if math.isfinite(float(lp))}
        assert got.keys() == mixed.keys(), (b, i)
        for u, p in mixed.items():
            assert got[u] == pytest.approx(p, abs=1e-12), (b, i, u)


NEXT = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
ROUTE_ROWS = torch.tensor([[0, 0, 1, 1, -1], [1, 1, 1, 0, 0]])


@pytest.mark.parametrize("mixture, kw", [
    ("weighted", {}),
    ("confidence", {"score": "logprob", "temperature": 0.7}),
    ("confidence", {"score": "neg_entropy", "temperature": 1.3}),
    ("route", {}),
])
def test_two_dense_teachers_equal_the_hand_written_mixture(mixture, kw):
    signals = [DenseSignal(dense(1)), DenseSignal(dense(2))]
    weights = [1.0, 3.0]
    out, log_w = module_mixture(signals, mixture, weights, route=ROUTE_ROWS, next_ids=NEXT, **kw)
    assert isinstance(out, DenseSignal)
    reference = mixture_reference([as_teacher(s) for s in signals], weights, mixture, route=ROUTE_ROWS,
                                  next_ids=NEXT, vocab_size=V, **kw)
    assert_matches(out, log_w, {k: v for k, v in reference.items() if v[0]})


@pytest.mark.parametrize("mixture, kw", [
    ("weighted", {}),
    ("confidence", {"score": "logprob", "temperature": 1.0}),
    ("confidence", {"score": "neg_entropy", "temperature": 0.5}),
    ("route", {}),
])
def test_top_k_and_dense_teachers_mix_over_the_union_of_their_ids(mixture, kw):
    """A top-k teacher with empty slots and a position without a distribution (a cross-tokenizer coverage gap), a
    second top-k teacher of another width, and a dense teacher: ids shared by several appear once; a teacher without
    a distribution at a position has weight 0 there."""
    signals = [TopKSignal(*topk(3, 4, empty=(0, 2), holes=1)), TopKSignal(*topk(4, 6)), DenseSignal(dense(5))]
    weights = [1.0, 0.5, 2.0]
    out, log_w = module_mixture(signals, mixture, weights, route=ROUTE_ROWS.clamp(max=1) * 2, next_ids=NEXT, **kw)
    assert isinstance(out, TopKSignal)
    out.validate(vocab_size=V)  # the one top-k rule: distinct ids, mass at most 1
    # The dense teacher lists its 4 most likely ids (mixture_top_k) and gives exact mass at every listed id.
    dense_listed = torch.log_softmax(dense(5), -1).topk(4, -1).indices
    reference = mixture_reference([as_teacher(s) for s in signals[:2]] + [as_teacher(signals[2])], weights, mixture,
                                  route=ROUTE_ROWS.clamp(max=1) * 2, next_ids=NEXT, vocab_size=V, **kw)
    union_ref = {}
    for (b, i), (mixed, w) in reference.items():
        ids = {int(u) for u in signals[0].token_ids[b, i][torch.isfinite(signals[0].logprobs[b, i])]}
        ids |= {int(u) for u in signals[1].token_ids[b, i]} | {int(u) for u in dense_listed[b, i]}
        union_ref[b, i] = ({u: p for u, p in mixed.items() if u in ids and w != [0.0] * 3}, w)
    assert_matches(out, log_w, union_ref)


def test_route_gives_the_routed_teacher_exactly():
    """Under route a top-k teacher's own records come out bit for bit where it is routed (log-space mixing)."""
    first, second = TopKSignal(*topk(3, 4, holes=1)), TopKSignal(*topk(4, 3))
    route = torch.tensor([[0, 0, 0, 1, 1], [1, 0, 1, 0, -1]])
    out, _ = module_mixture([first, second], "route", [1.0, 1.0], route=route)
    for b in range(B):
        for i in range(T):
            j = int(route[b, i])
            if j < 0:
                assert not torch.isfinite(out.logprobs[b, i]).any()
                continue
            teacher = (first, second)[j]
            keep = torch.isfinite(teacher.logprobs[b, i])
            want = dict(zip(teacher.token_ids[b, i][keep].tolist(), teacher.logprobs[b, i][keep].tolist()))
            got_keep = torch.isfinite(out.logprobs[b, i])
            got = dict(zip(out.token_ids[b, i][got_keep].tolist(), out.logprobs[b, i][got_keep].tolist()))
            assert got == want


class RowsSeen(TeacherSource):
    """A dense teacher of fixed logits that records which rows of input_ids it was asked about (a stand-in for the
    teacher model: the test is of the mixture's routing)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits, self.asked = logits, []

    def get_signal(self, batch):
        rows = [int(torch.nonzero((batch_row == IDS).all(-1))[0]) for batch_row in batch["input_ids"]]
        self.asked.append(rows)
        return DenseSignal(self.logits[rows])


IDS = torch.arange(B * T).reshape(B, T) % V


def test_route_runs_each_teacher_on_its_rows_only_and_logs_shares():
    first, second = RowsSeen(dense(1)), RowsSeen(dense(2))
    source = MixtureTeacherSource([Member("add", first), Member("sub", second)], mixture="route", vocab_size=V,
                                  top_k=4)
    labels = IDS.clone()
    labels[:, 0] = -100
    route = torch.tensor([[0] * T, [1] * T])
    out = source.get_signal({"input_ids": IDS, "labels": labels, ROUTE: route})
    assert first.asked == [[0]] and second.asked == [[1]]
    # Dense teachers only: each row gets its teacher's own logits, bit for bit (the loss normalises them).
    assert torch.equal(out.logits[0], dense(1)[0])
    assert torch.equal(out.logits[1], dense(2)[1])
    logs = source.metrics()
    assert logs == {"teacher/add/share": 0.5, "teacher/add/weight": 0.5, "teacher/sub/share": 0.5,
                    "teacher/sub/weight": 0.5}
    assert source.metrics()["teacher/add/share"] == 0.0  # a new window


def test_route_over_dense_teachers_in_packed_rows_picks_each_positions_teacher():
    """A packed row holding sequences of both teachers: every position gets its own teacher's logits; padding (-1)
    gets none, and the weights logged are the route's."""
    first, second = RowsSeen(dense(1)), RowsSeen(dense(2))
    source = MixtureTeacherSource([Member("add", first), Member("sub", second)], mixture="route", vocab_size=V,
                                  top_k=4)
    route = torch.tensor([[0, 0, 1, 1, -1], [1, 1, 1, 1, 1]])
    out = source.get_signal({"input_ids": IDS, "labels": IDS, ROUTE: route})
    assert first.asked == [[0]] and second.asked == [[0, 1]]
    assert torch.equal(out.logits[0, :2], dense(1)[0, :2]) and torch.equal(out.logits[0, 2:4], dense(2)[0, 2:4])
    assert torch.equal(out.logits[1], dense(2)[1])
    shares = source.metrics()
    assert shares["teacher/add/share"] == pytest.approx(2 / 8) and shares["teacher/sub/share"] == pytest.approx(6 / 8)


def test_route_without_the_route_column_names_the_collator():
    source = MixtureTeacherSource([Member("a", RowsSeen(dense(1)))], mixture="route", vocab_size=V, top_k=4)
    with pytest.raises(KeyError, match=ROUTE):
        source.get_signal({"input_ids": IDS})


@pytest.mark.parametrize("mixture", ["weighted", "confidence"])
def test_the_source_mixes_the_counted_positions_as_the_module_does(mixture):
    """Through MixtureTeacherSource: the counted positions (labels after the prompt) hold the mixture `mix` forms over
    the whole batch; the others, which the loss does not read, are left unformed (zero logits)."""
    first, second = RowsSeen(dense(1)), RowsSeen(dense(2))
    source = MixtureTeacherSource([Member("a", first), Member("b", second, 3.0)], mixture=mixture, vocab_size=V,
                                  top_k=4)
    labels = IDS.clone()
    labels[:, :2] = -100
    out = source.get_signal({"input_ids": IDS, "labels": labels})
    signals = [DenseSignal(dense(1)), DenseSignal(dense(2))]
    next_ids = torch.zeros_like(IDS)
    next_ids[:, :-1] = IDS[:, 1:]
    whole, _ = module_mixture(signals, mixture, [1.0, 3.0], next_ids=next_ids)
    counted = torch.zeros(B, T, dtype=torch.bool)
    counted[:, 1:4] = True  # positions whose next token is a label
    assert torch.allclose(out.logits[counted], whole.logits[counted], atol=1e-12)
    assert (out.logits[~counted] == 0).all()
