"""`axolotl xkd score` end to end, on a student and reward head written by a real `axolotl train` X-KD run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_cli, trained

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained_student(tiny_assets, tmp_path_factory) -> Path:
    return trained(tiny_assets, tmp_path_factory.mktemp("xkd_score"), {"max_steps": 3, "save_steps": 3})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_responses(trained_student, tiny_assets, tmp_path):
    eval_file = tiny_assets["data"] / "eval.jsonl"
    out = tmp_path / "scored.jsonl"
    proc = run_cli(["axolotl", "xkd", "score", "--model", str(trained_student), "--prompts", str(eval_file),
                    "--responses", str(eval_file), "--out", str(out), "--batch-size", "16", "--per-token"])
    assert "scoring" in proc.stderr  # the tqdm bar
    rows, inputs = read_jsonl(out), read_jsonl(eval_file)
    assert len(rows) == len(inputs) == 64
    for row, given in zip(rows, inputs):
        assert (row["prompt"], row["response"]) == (given["prompt"], given["response"])
        assert row["tokens"] == [*given["response"], "</s>"] and row["num_tokens"] == len(given["response"]) + 1
        assert row["reward_sum"] == pytest.approx(sum(row["reward_per_token"]), abs=1e-4)
        assert row["reward_mean"] == pytest.approx(row["reward_sum"] / row["num_tokens"])
        assert row["logprob_sum"] < 0 and row["finished"]
    # The trained head is no longer the zero initialisation: rewards differ across tokens.
    assert len({round(v, 6) for row in rows for v in row["reward_per_token"]}) > 10

    # Same numbers through the Python API, with another batch size.
    from axolotl_xkd.scoring import load_scorer

    api = load_scorer(trained_student).score([r["prompt"] for r in inputs], [r["response"] for r in inputs],
                                             batch_size=5)
    assert [s.reward_sum for s in api] == pytest.approx([r["reward_sum"] for r in rows], abs=1e-4)


def test_samples_reranked(trained_student, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"q": p}) + "\n" for p in ("12+34=", "50-7=", "3+3=")))
    args = ["--model", str(trained_student), "--prompts", str(prompts), "--prompt-field", "q", "--samples", "4",
            "--max-new-tokens", "6", "--seed", "3", "--batch-size", "2", "--rank-by", "sum"]
    first = run_cli(["axolotl", "xkd", "score", *args, "--out", str(tmp_path / "a.jsonl")])
    assert "sampling+scoring" in first.stderr
    # The same command in this process gives the same samples: sampling is seeded.
    assert invoke([*args, "--out", str(tmp_path / "b.jsonl")]).exit_code == 0
    rows, again = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    texts = lambda out: [[s["response"] for s in r["samples"]] for r in out]  # noqa: E731
    assert texts(rows) == texts(again)
    assert [s["reward_sum"] for r in rows for s in r["samples"]] == pytest.approx(
        [s["reward_sum"] for r in again for s in r["samples"]], abs=1e-5)
    assert [r["prompt"] for r in rows] == ["12+34=", "50-7=", "3+3="]
    for row in rows:
        sums = [s["reward_sum"] for s in row["samples"]]
        assert len(sums) == 4 and sums == sorted(sums, reverse=True)
        assert row["best"] == row["samples"][0]["response"] and row["rank_by"] == "reward_sum"
        assert all(1 <= s["num_tokens"] <= 6 for s in row["samples"])


def test_temperature_zero_is_greedy(trained_student, tmp_path):
    """--temperature 0 samples greedily, as the config's xkd.generation does: every sample is the greedy answer."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("12+34=", "3+3=")))
    out = tmp_path / "greedy.jsonl"
    assert invoke(["--model", str(trained_student), "--prompts", str(prompts), "--samples", "3", "--temperature", "0",
                   "--max-new-tokens", "4", "--raw", "--out", str(out)]).exit_code == 0
    for row in read_jsonl(out):
        assert len({s["response"] for s in row["samples"]}) == 1


def invoke(args: list[str]):
    """The `score` command run in this process (click's test runner), for the cheap error paths."""
    from click.testing import CliRunner

    from axolotl_xkd.cli.score import score

    return CliRunner().invoke(score, args)


def test_errors(trained_student, tiny_assets, tmp_path):
    eval_file = str(tiny_assets["data"] / "eval.jsonl")
    # The untrained base student has no reward head beside it.
    result = invoke(["--model", str(tiny_assets["student"]), "--prompts", eval_file, "--responses", eval_file])
    assert result.exit_code != 0 and "has no X-KD reward head" in result.output
    # Both or neither of --responses / --samples.
    for extra in ([], ["--responses", eval_file, "--samples", "2"]):
        result = invoke(["--model", str(trained_student), "--prompts", eval_file, *extra])
        assert result.exit_code != 0 and "exactly one of --responses FILE" in result.output
    # A prompts file without the field, and misaligned files.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n{"text": "2+2="}\n')
    result = invoke(["--model", str(trained_student), "--prompts", str(bad), "--samples", "2"])
    assert result.exit_code != 0 and f"{bad}:2 has no string field 'prompt'" in result.output
    result = invoke(["--model", str(trained_student), "--prompts", eval_file, "--responses", str(bad)])
    assert result.exit_code != 0 and "has no string field 'response'" in result.output
    # Neither --model nor --config: nothing names the student.
    result = invoke(["--prompts", eval_file, "--samples", "2"])
    assert result.exit_code != 0 and "give --model DIR" in result.output
    short = tmp_path / "short.jsonl"
    short.write_text('{"response": "2"}\n')
    result = invoke(["--model", str(trained_student), "--prompts", eval_file, "--responses", str(short)])
    assert result.exit_code != 0 and "has 1 responses but" in result.output
