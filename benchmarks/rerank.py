"""Best-of-n reranking by the X-KD learned reward on the tiny arithmetic task (issue 8). Not a test.

Builds the tiny assets (axolotl_xkd.tiny), trains one X-KD student per variant with a real
`axolotl train` (config from tests/support.base_config), samples n responses per held-out prompt
(a share of the task's distinct prompts removed from the student's training rows)
and compares exact-match accuracy of:
  random-of-n     expected accuracy of a uniformly random pick = mean accuracy of the n samples
  reward-sum      the sample with the highest summed mu_i (the spec's reranker)
  reward-mean     the highest mean mu_i per response token
  logprob         the highest student log-likelihood (a reranker that needs no reward head)
  oracle          some sample is correct (pass@n, the ceiling of any reranker)
  greedy          the student's greedy answer, for reference
Writes benchmarks/results/rerank.md (and .json).

    python -m benchmarks.rerank                       # all variants, about 10 minutes on 2 CPU cores
    python -m benchmarks.rerank --variants default --steps 100
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tests.support import base_config, merged, train, write_config  # sets the offline env first

REPO = Path(__file__).resolve().parents[1]

# name -> overrides of the tests/support.base_config dict
VARIANTS: dict[str, dict] = {
    "default": {"xkd": {"q_form": "logits"}},  # the spec's AVRIL form: forward_kl, w_kl = lambda = 1, gamma = 1
    "q_logprobs": {"xkd": {"q_form": "logprobs"}},
    "q_logprobs_gamma0.9": {"xkd": {"q_form": "logprobs", "gamma": 0.9}},
    # Q(s', a') replaced by its expectation under the teacher: the rewards no longer telescope to Q(s_0, a_0).
    "teacher_expected": {"xkd": {"td_target": "teacher_expected", "q_form": "logits"}},
    "teacher_expected_q_logprobs": {"xkd": {"td_target": "teacher_expected", "q_form": "logprobs"}},
}


def held_out_split(train_rows: list[dict], fraction: float, *, seed: int) -> tuple[list[dict], list[dict]]:
    """(student training rows, one row per held-out prompt): a seeded `fraction` of the distinct training
    prompts is taken out of the student's data. The teacher was trained on every prompt: it knows the task,
    and the student and its reward are scored on prompts they never trained on."""
    prompts = sorted({r["prompt"] for r in train_rows})
    held = set(random.Random(seed).sample(prompts, max(1, round(fraction * len(prompts)))))
    kept = [r for r in train_rows if r["prompt"] not in held]
    answers = {r["prompt"]: r["response"] for r in train_rows}
    return kept, [{"prompt": p, "response": answers[p]} for p in sorted(held)]


def greedy_answers(scorer, prompts: list[str], *, batch_size: int = 64) -> list[str]:
    """The student's greedy response per prompt."""
    import torch

    tok = scorer.tokenizer
    answers = []
    for start in range(0, len(prompts), batch_size):
        ids = [tok(p)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(map(len, ids))
        x = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in ids])[:, None]).long()
        with torch.inference_mode():
            out = scorer.model.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers += [tok.decode(r, skip_special_tokens=True) for r in out[:, width:].tolist()]
    return answers


def evaluate(student: Path, rows: list[dict], *, n: int, seed: int) -> dict:
    """Accuracies of every picking rule over `rows` (n samples each, temperature 1)."""
    from axolotl_xkd.scoring import load_scorer

    scorer = load_scorer(student)
    prompts = [r["prompt"] for r in rows]
    ranked = scorer.rerank(prompts, n, rank_by="sum", max_new_tokens=8, seed=seed, batch_size=32)
    rng = random.Random(seed)
    totals = dict.fromkeys(("random_expected", "random_draw", "reward_sum", "reward_mean", "logprob", "oracle"), 0.0)
    by_outcome: dict[bool, list] = {True: [], False: []}  # (reward_sum, reward_mean) of correct / wrong samples
    for row, group in zip(rows, ranked):
        hit = [s.response == row["response"] for s in group]
        totals["random_expected"] += sum(hit) / n
        totals["random_draw"] += hit[rng.randrange(n)]
        totals["reward_sum"] += hit[max(range(n), key=lambda k: group[k].reward_sum)]
        totals["reward_mean"] += hit[max(range(n), key=lambda k: group[k].reward_mean)]
        totals["logprob"] += hit[max(range(n), key=lambda k: group[k].logprob_sum)]
        totals["oracle"] += any(hit)
        for s, ok in zip(group, hit):
            by_outcome[ok].append((s.reward_sum, s.reward_mean))
    greedy = greedy_answers(scorer, prompts)
    result = {k: v / len(rows) for k, v in totals.items()}
    result["greedy"] = sum(g == r["response"] for g, r in zip(greedy, rows)) / len(rows)
    for ok, name in ((True, "correct"), (False, "wrong")):
        values = by_outcome[ok]
        result[f"mean_reward_sum_{name}"] = sum(v[0] for v in values) / max(len(values), 1)
        result[f"mean_reward_mean_{name}"] = sum(v[1] for v in values) / max(len(values), 1)
        result[f"samples_{name}"] = len(values)
    # Same-prompt discrimination: how often a correct sample outranks a wrong one of the same prompt.
    result["pairwise_auc_sum"], result["pairwise_auc_logprob"] = pairwise_auc(rows, ranked)
    return result


def pairwise_auc(rows: list[dict], ranked: list[list]) -> tuple[float, float]:
    """P(score(correct) > score(wrong)) over (correct, wrong) sample pairs of the same prompt, ties 1/2."""
    wins = {"sum": 0.0, "logprob": 0.0}
    pairs = 0
    for row, group in zip(rows, ranked):
        good = [s for s in group if s.response == row["response"]]
        bad = [s for s in group if s.response != row["response"]]
        for g in good:
            for b in bad:
                pairs += 1
                for name, attr in (("sum", "reward_sum"), ("logprob", "logprob_sum")):
                    x, y = getattr(g, attr), getattr(b, attr)
                    wins[name] += 1.0 if x > y else 0.5 if x == y else 0.0
    return (wins["sum"] / pairs, wins["logprob"] / pairs) if pairs else (float("nan"), float("nan"))


def write_report(path: Path, results: dict, args: argparse.Namespace, n_prompts: int, command: str) -> None:
    """Markdown table of the accuracies, one row per variant."""
    cols = ("greedy", "random_expected", "reward_sum", "reward_mean", "logprob", "oracle")
    lines = [
        "# Best-of-n reranking by the X-KD learned reward (tiny arithmetic task)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}, "
        f"CPU only; n = {args.samples} samples per prompt at temperature 1; {n_prompts} held-out prompts, each "
        f"sampled in {args.rounds} independent groups of n "
        f"(a seeded {args.held_out:.0%} of the task's distinct prompts, removed from the student's training rows; "
        f"the teacher saw every prompt); student trained {args.steps} steps "
        f"(micro batch {args.micro_batch_size}) by `axolotl train` with the plugin; tiny task with "
        f"{args.train_rows} training rows, teacher trained {args.teacher_steps} steps.",
        "",
        "Exact-match accuracy of the picked response (random = expected accuracy of a uniformly random pick "
        "= mean accuracy of the n samples; oracle = pass@n):",
        "",
        "| variant | " + " | ".join(cols) + " | AUC reward_sum | AUC logprob | train s |",
        "|---" * (len(cols) + 4) + "|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
            + f" | {r['pairwise_auc_sum']:.3f} | {r['pairwise_auc_logprob']:.3f} | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "AUC: over pairs (correct sample, wrong sample) of the same prompt, the probability that the score ranks "
        "the correct one higher (0.5 = no signal).",
        "",
        "Mean reward of correct vs wrong samples:",
        "",
        "| variant | reward_sum correct | reward_sum wrong | reward_mean correct | reward_mean wrong "
        "| #correct | #wrong |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['mean_reward_sum_correct']:.3f} | {r['mean_reward_sum_wrong']:.3f} | "
            f"{r['mean_reward_mean_correct']:.3f} | {r['mean_reward_mean_wrong']:.3f} | {r['samples_correct']} | "
            f"{r['samples_wrong']} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "rerank_bench", help="scratch folder")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per student (default: 150)")
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8, help="n of best-of-n (default: 8)")
    parser.add_argument("--held-out", type=float, default=0.3,
                        help="share of the task's distinct prompts kept out of the student's data (default: 0.3)")
    parser.add_argument("--train-rows", type=int, default=4096, help="tiny task training rows (default: 4096)")
    parser.add_argument("--teacher-steps", type=int, default=1500, help="tiny teacher steps (default: 1500)")
    parser.add_argument("--rounds", type=int, default=4, help="groups of n samples per held-out prompt (default: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "rerank.md")
    args = parser.parse_args()

    from axolotl_xkd.tiny import build_all, write_jsonl

    assets = build_all(
        args.work / "tiny", teacher_steps=args.teacher_steps, train_rows=args.train_rows, seed=args.seed
    )
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    kept, rows = held_out_split(read(assets["data"] / "train.jsonl"), args.held_out, seed=args.seed + 1000)
    student_data = args.work / "student_data"
    write_jsonl(student_data / "train.jsonl", kept)
    assets = {**assets, "data": student_data}
    results = {}
    for name in args.variants:
        out = args.work / name
        config = merged(base_config(assets, out), {
            **VARIANTS[name],
            "max_steps": args.steps, "micro_batch_size": args.micro_batch_size, "gradient_accumulation_steps": 1,
            "num_epochs": 1000, "save_steps": args.steps, "logging_steps": 10,
            "sequence_len": 16, "seed": args.seed,
        })
        started = time.perf_counter()
        train(write_config(out / "config.yml", config))
        seconds = time.perf_counter() - started
        # Each held-out prompt is drawn --rounds times (independent groups of n samples) to narrow the noise.
        results[name] = {**evaluate(out / "model", rows * args.rounds, n=args.samples, seed=args.seed),
                         "train_seconds": seconds}
        print(name, json.dumps(results[name]), flush=True)
    command = "python -m benchmarks.rerank " + " ".join(sys.argv[1:])
    write_report(args.out, results, args, len(rows), command.strip())
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
