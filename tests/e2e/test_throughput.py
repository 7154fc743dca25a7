"""End to end, on whichever supported Axolotl release is installed (CI runs 0.19 and 0.21): Axolotl's throughput
metric in X-KD runs.

Axolotl counts `tokens/trainable` (labels != -100) and `tokens/total` in its own `compute_loss`, which the X-KD
trainer replaces; the trainer keeps the counters itself (`compat.count_trained_tokens`). An X-KD run and a plain SFT
run on the same data and seed train on the same batches, so they must log the same counts at every step, and the
X-KD run logs `tokens/train_per_sec_per_gpu` and the time shares of its step.
"""

from __future__ import annotations

import pytest

from tests.support import log_history, trained

pytestmark = pytest.mark.e2e

SHORT = {"max_steps": 3, "save_steps": 3, "logging_steps": 1}


def train_logs(tiny_assets, folder, overrides: dict) -> list[dict]:
    return [e for e in log_history(trained(tiny_assets, folder, {**SHORT, **overrides})) if "loss" in e]


def test_xkd_and_sft_log_the_same_token_counts_and_xkd_its_throughput(tiny_assets, tmp_path):
    sft = train_logs(tiny_assets, tmp_path / "sft", {"plugins": None, "xkd": None})
    xkd = train_logs(tiny_assets, tmp_path / "xkd", {})
    counts = [[(e["tokens/trainable"], e["tokens/total"]) for e in logs] for logs in (sft, xkd)]
    assert counts[0] == counts[1]
    assert 0 < counts[0][0][0] < counts[0][0][1] and counts[0][-1][0] > counts[0][0][0]  # cumulative, prompts masked
    # Axolotl's rate is a delta between two logs: from the second log on.
    assert all(e["tokens/train_per_sec_per_gpu"] > 0 for e in xkd[1:])
    for e in xkd:
        assert 0 < e["xkd/teacher_time_share"] < 1 and 0 < e["xkd/loss_time_share"] < 1
        assert e["xkd/rollout_time_share"] == 0
        assert e["xkd/teacher_time_share"] + e["xkd/loss_time_share"] < 1


def test_on_policy_steps_count_the_tokens_they_trained_on(tiny_assets, tmp_path):
    """An on-policy step trains on the student's responses, not the dataset's: its trainable tokens are the sampled
    response tokens (8 rows x 2 micro-batches a step, each row one response, all of it labelled)."""
    logs = train_logs(tiny_assets, tmp_path, {
        "micro_batch_size": 8, "gradient_accumulation_steps": 2,
        "xkd": {"sequences": "on_policy", "on_policy_fraction": 1.0, "generation": {"max_new_tokens": 6}}})
    trainable = [0] + [e["tokens/trainable"] for e in logs]
    per_step = [b - a for a, b in zip(trainable, trainable[1:])]
    assert per_step == [round(e["xkd/gen_length"] * 16) for e in logs]
    assert all(0 < e["xkd/rollout_time_share"] < 1 for e in logs)
