"""axolotl_xkd.sequences and axolotl_xkd.on_policy: prompts cut from collated batches, sampled responses,
rebuilt batches, and the per-step on-policy choice.

Greedy responses are checked against a plain argmax loop over the model's forward (no `generate`).
"""

from __future__ import annotations

import pytest
import torch

from axolotl_xkd.args import GenerationSettings
from axolotl_xkd.on_policy import OnPolicySampler
from axolotl_xkd.sequences import (
    IGNORE_INDEX,
    collate_rows,
    pad_token_id,
    prompts_of,
    response_rows,
    sample_responses,
)
from axolotl_xkd.tiny import build_model, build_tokenizer

M = IGNORE_INDEX


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return tokenizer, build_model(tokenizer, hidden=32, layers=2, seed=3).eval()


def test_prompts_of_unpacked_and_packed_batches():
    unpacked = {
        "input_ids": torch.tensor([[1, 5, 6, 7, 8, 0], [1, 9, 9, 0, 0, 0]]),
        "labels": torch.tensor([[M, M, M, 7, 8, M], [M, M, 9, M, M, M]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]),
    }
    assert prompts_of(unpacked) == [[1, 5, 6], [1, 9]]
    # One packed row: three sequences, the middle one without a label (left out), then padding.
    packed = {
        "input_ids": torch.tensor([[1, 5, 6, 1, 7, 1, 8, 9, 0]]),
        "labels": torch.tensor([[M, M, 6, M, M, M, M, 9, M]]),
        "attention_mask": torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 0]]),
    }
    assert prompts_of(packed) == [[1, 5], [1, 8]]


def test_collate_rows_masks_prompts_and_follows_the_batch():
    like = {"input_ids": torch.zeros(1, 2, dtype=torch.int32), "labels": torch.zeros(1, 2, dtype=torch.int64),
            "position_ids": torch.zeros(1, 2, dtype=torch.int64)}
    batch = collate_rows(response_rows([[1, 5], [1, 6, 7]], [[8, 2], []]), pad_id=0, like=like)
    assert batch["input_ids"].tolist() == [[1, 5, 8, 2], [1, 6, 7, 0]]
    assert batch["input_ids"].dtype == torch.int32
    assert batch["labels"].tolist() == [[M, M, 8, 2], [M, M, M, M]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 2


def argmax_loop(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token == eos:
                break
    return out


def test_greedy_responses_match_an_argmax_loop_and_respect_max_length(tiny):
    tokenizer, model = tiny
    prompts = [tokenizer("3+4=")["input_ids"], tokenizer("12-7=")["input_ids"]]
    sampling = GenerationSettings(max_new_tokens=5, temperature=0)
    got = sample_responses(model, prompts, sampling, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    assert got == [argmax_loop(model, p, 5, tokenizer.eos_token_id) for p in prompts]
    short = sample_responses(model, prompts, sampling, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                             max_length=7)
    assert [len(p) + len(r) <= 7 for p, r in zip(prompts, short)] == [True, True]
    assert [r == g[: len(r)] for r, g in zip(short, got)] == [True, True]


def test_sampled_responses_are_seeded_and_prompt_major(tiny):
    tokenizer, model = tiny
    prompts = [tokenizer("3+4=")["input_ids"], tokenizer("9=")["input_ids"]]
    sampling = GenerationSettings(max_new_tokens=6, temperature=1.5)
    draws = []
    for _ in range(2):
        torch.manual_seed(11)
        draws.append(sample_responses(model, prompts, sampling, pad_id=tokenizer.pad_token_id,
                                      eos_id=tokenizer.eos_token_id, n=3))
    assert draws[0] == draws[1] and len(draws[0]) == 6
    assert len({tuple(r) for r in draws[0]}) > 1  # a random model at temperature 1.5 does not repeat itself


def sampler(fraction: float, seed: int = 0) -> OnPolicySampler:
    return OnPolicySampler(GenerationSettings(max_new_tokens=4, temperature=0), fraction=fraction, seed=seed, pad_id=0,
                           eos_id=2, max_length=16)


def test_on_policy_choice_is_a_function_of_seed_and_step():
    first, again, other = sampler(0.3), sampler(0.3), sampler(0.3, seed=1)
    choices = [first.is_on_policy(step) for step in range(2000)]
    assert choices == [again.is_on_policy(step) for step in range(2000)]
    assert choices != [other.is_on_policy(step) for step in range(2000)]
    assert 0.26 < sum(choices) / len(choices) < 0.34
    assert not any(sampler(0.0).is_on_policy(s) for s in range(100))
    assert all(sampler(1.0).is_on_policy(s) for s in range(100))
    assert first.metrics()["on_policy_fraction"] == pytest.approx(sum(choices) / len(choices))


def test_sample_replaces_responses_and_restores_training_mode(tiny):
    tokenizer, model = tiny
    ids = tokenizer("3+4=7")["input_ids"] + [tokenizer.eos_token_id]
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([[M] * 5 + ids[5:]]),
             "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    model.train()
    s = sampler(1.0)
    (new,) = s.sample(model, [batch], step=0)
    assert model.training
    response = argmax_loop(model.eval(), ids[:5], 4, tokenizer.eos_token_id)
    width = 5 + len(response)
    assert new["input_ids"][0, :width].tolist() == ids[:5] + response
    assert new["labels"][0, :width].tolist() == [M] * 5 + response
    logs = s.metrics()
    assert logs == {"on_policy_fraction": 0.0, "gen_length": len(response)}


def window(tokenizer, problems: list[str]) -> list[dict]:
    """One micro-batch per problem, as Axolotl collates them (prompt masked, right-padded to 12)."""
    batches = []
    for problem in problems:
        prompt = tokenizer(problem)["input_ids"]
        answer = [5] * (12 - len(prompt))
        batches.append({"input_ids": torch.tensor([prompt + answer]),
                        "labels": torch.tensor([[M] * len(prompt) + answer]),
                        "attention_mask": torch.ones(1, 12, dtype=torch.long)})
    return batches


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_a_prompts_sample_does_not_depend_on_the_window_or_generation_batch(tiny, temperature):
    """One generation per step, per-prompt seeds: the same prompt at the same step gets the same response whether
    it is answered alone, in a window of four micro-batches, or in generate calls of two prompts."""
    tokenizer, model = tiny

    def answers(problems: list[str], batch_size: int | None, step: int = 7) -> dict[str, list[int]]:
        s = OnPolicySampler(GenerationSettings(max_new_tokens=8, temperature=temperature, batch_size=batch_size),
                            fraction=1.0, seed=5, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                            max_length=32)
        out = s.sample(model, window(tokenizer, problems), step=step)
        return {p: b["input_ids"][0, b["labels"][0] != M].tolist() for p, b in zip(problems, out)}

    problems = ["3+4=", "12-7=", "9=", "100+1="]
    together = answers(problems, None)
    assert together == answers(problems, 2) == answers(problems[::-1], 1)
    assert together["3+4="] == answers(["3+4="], None)["3+4="]
    if temperature:
        # Sampled, not greedy: another step (or a repeated prompt in another micro-batch) draws otherwise.
        assert answers(problems, None, step=8) != together


def test_repeated_prompts_of_a_step_are_answered_once(tiny):
    tokenizer, model = tiny
    calls = []
    generate = model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or generate(**kw)
    try:
        s = OnPolicySampler(GenerationSettings(max_new_tokens=4, temperature=1.0), fraction=1.0, seed=0,
                            pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_length=32)
        out = s.sample(model, window(tokenizer, ["3+4=", "9=", "3+4="]), step=0)
    finally:
        del model.generate
    assert calls == [2]
    assert out[0]["input_ids"].tolist() == out[2]["input_ids"].tolist()


def test_seeded_sampling_draws_from_the_tempered_distribution(tiny):
    """RowSeededSampling (argmax of logits / T plus Gumbel noise) samples softmax(logits / T): the first tokens of
    4000 seeded responses to one prompt have the model's tempered next-token frequencies."""
    tokenizer, model = tiny
    prompt = tokenizer("3+4=")["input_ids"]
    sampling = GenerationSettings(max_new_tokens=1, temperature=1.5)
    draws = sample_responses(model, [prompt] * 4000, sampling, pad_id=tokenizer.pad_token_id, eos_id=None,
                             seeds=list(range(4000)))
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=model.config.vocab_size).float()
    with torch.no_grad():
        expected = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1] / 1.5, -1)
    assert (counts / 4000 - expected).abs().max() < 0.025


def test_pad_token_id_is_pad_else_eos_else_zero():
    """One padding rule for every batch the package builds (store/write.py used 0 where the others used EOS)."""
    tokenizer = build_tokenizer()
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id
    tokenizer.pad_token = None
    assert pad_token_id(tokenizer) == tokenizer.eos_token_id
    tokenizer.eos_token = None
    assert pad_token_id(tokenizer) == 0


def test_on_policy_samples_keep_their_prompts_route(tiny):
    """Under `mixture: route` each rebuilt row keeps the teacher of the sequence its prompt came from (packed rows:
    per segment), -1 on padding."""
    from axolotl_xkd.keys import ROUTE

    tokenizer, model = tiny
    first = tokenizer("3+4=")["input_ids"] + [5, 5]
    second = tokenizer("12+1=")["input_ids"] + [5]
    batch = {"input_ids": torch.tensor([first + second]),
             "labels": torch.tensor([[M] * 4 + [5, 5] + [M] * 5 + [5]]),
             "attention_mask": torch.ones(1, 12, dtype=torch.long),
             "position_ids": torch.tensor([list(range(6)) + list(range(6))]),
             ROUTE: torch.tensor([[1] * 6 + [0] * 6])}
    (new,) = sampler(1.0).sample(model, [batch], step=0)
    assert new["input_ids"].shape[0] == 2
    for row, teacher in zip(range(2), (1, 0)):
        length = int(new["attention_mask"][row].sum())
        assert new[ROUTE][row, :length].tolist() == [teacher] * length
        assert (new[ROUTE][row, length:] == -1).all()
