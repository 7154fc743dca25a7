"""axolotl_xkd.scoring: the learned reward applied to (prompt, response) pairs, and best-of-n reranking.

The student here is a tiny random Llama (axolotl_xkd.tiny) saved with a reward head whose weights are
random, so every position gets a different mu_i; loading goes through the real from_pretrained and
reward_store code. The hand computation reads the hidden states with output_hidden_states, not with
the scorer's hook.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from axolotl_xkd.integrity import seal_json
from axolotl_xkd.losses.reward_head import VariationalRewardHead
from axolotl_xkd.reward_store import CONFIG_NAME, WEIGHTS_NAME, save_reward_head
from axolotl_xkd.scoring import load_scorer
from axolotl_xkd.tiny import build_model, build_tokenizer

PROMPTS = ["12+34=", "7-80=", "99+9=", "3+4=", "50-50=", "1+1="]
RESPONSES = ["46", "-73", "108", "7", "0", "2 and more text"]
FP32 = {"atol": 1e-5, "rtol": 5e-4}


def make_student(directory: Path, *, reward_input: str = "next_state", hidden: int = 32, seed: int = 0) -> Path:
    """A tiny random student with a random reward head saved beside it, as an X-KD run writes them."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden=hidden, layers=2, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    head = VariationalRewardHead(
        hidden,
        metadata={
            "reward_input": reward_input,
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "base_model_type": "llama",
        },
    )
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        head.proj.weight.normal_()
        head.proj.bias.normal_()
    save_reward_head(head.state_dict(), head.config(), directory)
    return directory


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_student(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def scorer(student):
    return load_scorer(student)


def by_hand(student_dir: Path, prompt: str, response: str, reward_input: str) -> torch.Tensor:
    """mu_i for each response token (EOS appended), from output_hidden_states and the head's saved weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    weights = load_file(str(student_dir / WEIGHTS_NAME))
    prompt_ids = tok(prompt)["input_ids"]
    ids = prompt_ids + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    mu = hidden @ weights["proj.weight"][0] + weights["proj.bias"][0]
    # Response token at position p is action a_{p-1}; next_state reads R from h_p, state from h_{p-1}.
    positions = torch.arange(len(prompt_ids), len(ids))
    return mu[positions if reward_input == "next_state" else positions - 1]


@pytest.mark.parametrize("reward_input", ["next_state", "state"])
def test_matches_head_applied_by_hand(tmp_path, reward_input):
    student_dir = make_student(tmp_path, reward_input=reward_input)
    scored = load_scorer(student_dir).score(PROMPTS, RESPONSES, batch_size=3)
    for s, prompt, response in zip(scored, PROMPTS, RESPONSES):
        expected = by_hand(student_dir, prompt, response, reward_input)
        torch.testing.assert_close(torch.tensor(s.reward_per_token), expected, **FP32)
        assert s.num_tokens == len(expected) == len(response) + 1
        assert s.reward_sum == pytest.approx(float(expected.sum()), abs=1e-4)
        assert s.reward_mean == pytest.approx(s.reward_sum / s.num_tokens)
        assert s.finished and s.token_ids[-1] == 2


def test_state_and_next_state_read_different_positions(tmp_path):
    """Guards the alignment: the two reward_input forms must not collapse onto one position."""
    a = load_scorer(make_student(tmp_path / "a", reward_input="next_state")).score(PROMPTS[:1], RESPONSES[:1])[0]
    b = load_scorer(make_student(tmp_path / "b", reward_input="state")).score(PROMPTS[:1], RESPONSES[:1])[0]
    assert a.reward_per_token[:-1] == pytest.approx(b.reward_per_token[1:], abs=1e-5)
    assert a.reward_per_token != pytest.approx(b.reward_per_token, abs=1e-3)


def test_deterministic(scorer):
    first = scorer.score(PROMPTS, RESPONSES, batch_size=4)
    second = scorer.score(PROMPTS, RESPONSES, batch_size=4)
    assert [s.reward_per_token for s in first] == [s.reward_per_token for s in second]
    assert [s.logprob_sum for s in first] == [s.logprob_sum for s in second]


@pytest.mark.parametrize("batch_size,padding_side", [(4, "right"), (4, "left"), (6, "left"), (1, "left")])
def test_batch_size_and_padding_invariant(scorer, batch_size, padding_side):
    alone = scorer.score(PROMPTS, RESPONSES, batch_size=1, padding_side="right")
    batched = scorer.score(PROMPTS, RESPONSES, batch_size=batch_size, padding_side=padding_side)
    for a, b in zip(alone, batched):
        torch.testing.assert_close(torch.tensor(b.reward_per_token), torch.tensor(a.reward_per_token), **FP32)
        torch.testing.assert_close(torch.tensor(b.logprob_sum), torch.tensor(a.logprob_sum), **FP32)


def test_append_eos_false_scores_only_the_response(scorer):
    with_eos = scorer.score(PROMPTS[:2], RESPONSES[:2])
    without = scorer.score(PROMPTS[:2], RESPONSES[:2], append_eos=False)
    for a, b in zip(with_eos, without):
        assert b.num_tokens == a.num_tokens - 1 and not b.finished
        assert b.reward_per_token == pytest.approx(a.reward_per_token[:-1], abs=1e-5)


def test_rerank_sorted_seeded_and_consistent_with_score(scorer):
    ranked = scorer.rerank(PROMPTS[:3], 4, max_new_tokens=5, seed=7, batch_size=2, rank_by="sum")
    again = scorer.rerank(PROMPTS[:3], 4, max_new_tokens=5, seed=7, batch_size=2, rank_by="sum")
    assert [[s.token_ids for s in g] for g in ranked] == [[s.token_ids for s in g] for g in again]
    for prompt, group in zip(PROMPTS, ranked):
        assert len(group) == 4 and all(s.prompt == prompt for s in group)
        sums = [s.reward_sum for s in group]
        assert sums == sorted(sums, reverse=True)
        for s in group:
            assert 1 <= s.num_tokens <= 5 and s.finished == (s.token_ids[-1] == scorer.tokenizer.eos_token_id)
        # Rescoring the sampled tokens one by one gives the same reward.
        rescored = scorer.score_ids([scorer.tokenizer(prompt)["input_ids"]] * 4, [s.token_ids for s in group],
                                    batch_size=1)
        assert [r.reward_sum for r in rescored] == pytest.approx(sums, abs=1e-4)
    by_mean = scorer.rerank(PROMPTS[:3], 4, max_new_tokens=5, seed=7, batch_size=2, rank_by="mean")
    for group in by_mean:
        means = [s.reward_mean for s in group]
        assert means == sorted(means, reverse=True)
    # The default: the student's own log-likelihood, the better pick in the reranking benchmark.
    for group in scorer.rerank(PROMPTS[:3], 4, max_new_tokens=5, seed=7, batch_size=2):
        logprobs = [s.logprob_sum for s in group]
        assert logprobs == sorted(logprobs, reverse=True)


def test_per_token_json(scorer):
    row = scorer.score(PROMPTS[:1], RESPONSES[:1])[0].to_json(per_token=True, tokenizer=scorer.tokenizer)
    assert row["tokens"] == ["4", "6", "</s>"]
    assert len(row["reward_per_token"]) == len(row["reward_std_per_token"]) == 3
    assert all(s > 0 for s in row["reward_std_per_token"])
    json.dumps(row)


def test_no_reward_head(tmp_path):
    student_dir = make_student(tmp_path)
    (student_dir / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="has no X-KD reward head.*reward_kl_weight or xkd.td_weight"):
        load_scorer(student_dir)


def test_head_from_a_model_with_another_hidden_size(tmp_path):
    student_dir = make_student(tmp_path / "a", hidden=32)
    other = make_student(tmp_path / "b", hidden=64)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        (student_dir / name).write_bytes((other / name).read_bytes())
    with pytest.raises(ValueError, match="does not belong to this model: hidden_size 64 but the model's is 32"):
        load_scorer(student_dir)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("vocab_size", 1000, "vocab_size 1000 but the tokenizer has 79 tokens"),
        ("eos_token_id", 5, "eos_token_id 5 but the tokenizer's is 2"),
        ("base_model_type", "gpt2", "base_model_type 'gpt2' but the model is 'llama'"),
    ],
)
def test_head_from_another_tokenizer_or_model(tmp_path, key, value, message):
    student_dir = make_student(tmp_path)
    config = json.loads((student_dir / CONFIG_NAME).read_text())
    (student_dir / CONFIG_NAME).write_text(seal_json({**config, key: value}))  # as another run would have saved it
    with pytest.raises(ValueError, match=message):
        load_scorer(student_dir)


def test_bad_inputs(scorer):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorer.score(PROMPTS[:2], RESPONSES[:1])
    with pytest.raises(ValueError, match="response 1 is empty and append_eos=False"):
        scorer.score(PROMPTS[:2], ["1", ""], append_eos=False)
