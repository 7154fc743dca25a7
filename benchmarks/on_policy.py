"""On-policy benchmark: the step time of on-policy X-KD (every step on the student's samples) as a ratio to X-KD on
the dataset's sequences, with generation per micro-batch (before) and once per optimizer step (after), and the
share of the step spent generating; measured in the same run, runs alternating.

    python -m benchmarks.on_policy [--steps 12] [--repeats 2] [--max-new-tokens 64] [--micro-batch-size 4]
        [--gradient-accumulation-steps 4] [--before-rev REV]

Builds the tiny assets in code (axolotl_xkd.tiny; nothing is downloaded); the teacher runs in process; sampling at
temperature 1. Arms: `dataset` (no generation), `per_micro_batch` (`generation.batch_size` = the micro-batch size:
one `generate` call per micro-batch, as before this change), `per_step` (the default: one call for the step's
distinct prompts) and, with `--before-rev`, `before` (the plugin as of that git revision, extracted with
`git archive` and put first on PYTHONPATH). Step time = train_runtime / steps; the generation share is the
trainer's `xkd/rollout_time_share`. Writes benchmarks/results/on_policy.md and prints it.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import write_report
from benchmarks.harness import log_history, merged, train, write_config
from benchmarks.server_teacher import step_seconds, timing_setup
from benchmarks.step import cpu_model

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "benchmarks" / "results" / "on_policy.md"


def extract(rev: str, into: Path) -> Path:
    """The package `axolotl_xkd` as of git revision `rev`, extracted under `into`; returns the folder to put on
    PYTHONPATH."""
    archive = subprocess.run(["git", "archive", rev, "axolotl_xkd"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=4)
    parser.add_argument("--before-rev", default=None, help="also run the plugin of this git revision ('before')")
    args = parser.parse_args()
    import torch

    from axolotl_xkd import __version__

    work, _, config = timing_setup("xkd_on_policy_bench_", args.steps, args.micro_batch_size)
    # Room for the prompt (about 6 tokens) and every new token.
    config = merged(config, {"gradient_accumulation_steps": args.gradient_accumulation_steps,
                             "sequence_len": 16 + args.max_new_tokens})
    on_policy = {"sequences": "on_policy", "on_policy_fraction": 1.0,
                 "generation": {"max_new_tokens": args.max_new_tokens}}
    arms = {
        "dataset": ({"sequences": "dataset"}, None),
        "per_micro_batch": (merged(on_policy, {"generation": {"batch_size": args.micro_batch_size}}), None),
        "per_step": (on_policy, None),
    }
    if args.before_rev:
        arms["before"] = (on_policy, extract(args.before_rev, work / "before"))
    times: dict[str, list[float]] = {name: [] for name in arms}
    shares: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(args.repeats):
        for name, (xkd, path) in arms.items():
            out = work / f"{name}-{r}"
            run = merged(config, {"output_dir": str(out / "model"), "xkd": xkd})
            env = None if path is None else {"PYTHONPATH": f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            proc = train(write_config(out / "cfg.yml", run), env=env)
            times[name].append(step_seconds(proc.stdout + proc.stderr, args.steps))
            logged = [e for e in log_history(out / "model") if "loss" in e][-1]
            share = logged.get("xkd/rollout_time_share", logged.get("xkd/gen_time_share"))
            if name != "dataset" and share is not None:
                shares[name].append(share)
            print(f"{name} repeat {r}: {times[name][-1] * 1000:.1f} ms/step", flush=True)
    base = statistics.median(times["dataset"])
    command = "python -m benchmarks.on_policy " + " ".join(sys.argv[1:])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in arms:
        median = statistics.median(times[name])
        share = f"{statistics.median(shares[name]):.2f}" if shares[name] else "-"
        rows.append(f"| {name} | {', '.join(f'{t * 1000:.1f}' for t in times[name])} | {median * 1000:.1f} | "
                    f"{median / base:.2f} | {share} |")
    speedup = statistics.median(times["per_micro_batch"]) / statistics.median(times["per_step"])
    report = "\n".join([
        "# On-policy benchmark",
        "",
        f"`{command.strip()}`",
        "",
        f"- date {datetime.now(UTC).isoformat(timespec='seconds')}, axolotl_xkd {__version__}, "
        f"torch {torch.__version__}, device {device}, CPU {cpu_model()} ({os.cpu_count()} cores), "
        f"{platform.machine()}",
        f"- tiny Llama student and teacher (axolotl_xkd.tiny), in-process teacher, micro_batch_size "
        f"{args.micro_batch_size}, gradient_accumulation_steps {args.gradient_accumulation_steps}, sequence_len "
        f"{config['sequence_len']}, {args.steps} steps per run, max_new_tokens {args.max_new_tokens}, temperature 1",
        "- step time = train_runtime / steps, median of the repeats (runs alternate the arms); it includes the "
        "checkpoint written at the last step, which dilutes the ratios; the generation share (generation seconds "
        "over wall seconds from the first step to the last log) does not include it",
        "",
        "| arm | ms/step (each repeat) | median ms/step | / dataset step | generation share |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"**on-policy step, per micro-batch / per optimizer step: {speedup:.2f}x** (target: at least 2x)",
        "",
    ])
    write_report(RESULTS, report)


if __name__ == "__main__":
    main()
