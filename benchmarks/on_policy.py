"""On-policy benchmark: the share of an on-policy step spent generating, and the step time of on-policy
X-KD (every step on the student's samples) as a ratio to X-KD on the dataset's sequences, measured in
the same run, runs alternating.

    python -m benchmarks.on_policy [--steps 40] [--repeats 2] [--max-new-tokens 8] [--micro-batch-size 8]

Builds the tiny assets in code (axolotl_xkd.tiny; nothing is downloaded); the teacher runs in process.
Step time = train_runtime / steps; the generation share is the trainer's own `xkd/gen_time_share`
(generation seconds / wall seconds over the run). Writes benchmarks/results/on_policy.md and prints it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import write_report
from benchmarks.server_teacher import step_seconds, timing_setup
from tests.support import log_history, merged, train, write_config

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "benchmarks" / "results" / "on_policy.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args()
    import torch

    from axolotl_xkd import __version__

    work, _, config = timing_setup("xkd_on_policy_bench_", args.steps, args.micro_batch_size)
    sources = {
        "dataset": {"sequences": "dataset"},
        "on_policy": {"sequences": "on_policy", "on_policy_fraction": 1.0,
                      "generation": {"max_new_tokens": args.max_new_tokens}},
    }
    times: dict[str, list[float]] = {name: [] for name in sources}
    shares: list[float] = []
    lengths: list[float] = []
    for r in range(args.repeats):
        for name, xkd in sources.items():
            out = work / f"{name}-{r}"
            run = merged(config, {"output_dir": str(out / "model"), "xkd": xkd})
            proc = train(write_config(out / "cfg.yml", run))
            times[name].append(step_seconds(proc.stdout + proc.stderr, args.steps))
            if name == "on_policy":
                logged = [e for e in log_history(out / "model") if "xkd/gen_time_share" in e][-1]
                shares.append(logged["xkd/gen_time_share"])
                lengths.append(logged["xkd/gen_length"])
            print(f"{name} repeat {r}: {times[name][-1] * 1000:.1f} ms/step", flush=True)
    base, on = statistics.median(times["dataset"]), statistics.median(times["on_policy"])
    command = "python -m benchmarks.on_policy " + " ".join(sys.argv[1:])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = "\n".join([
        "# On-policy benchmark",
        "",
        f"`{command.strip()}`",
        "",
        f"- date {datetime.now(UTC).isoformat(timespec='seconds')}, axolotl_xkd {__version__}, "
        f"torch {torch.__version__}, device {device}, {platform.processor() or platform.machine()}",
        f"- tiny Llama student and teacher (axolotl_xkd.tiny), in-process teacher, micro_batch_size "
        f"{args.micro_batch_size}, sequence_len {config['sequence_len']}, {args.steps} steps per run, "
        f"max_new_tokens {args.max_new_tokens}, temperature 1",
        "- step time = train_runtime / steps, median of the repeats (runs alternate dataset, on_policy); it includes "
        "the checkpoint written at the last step, which dilutes the ratio; the generation share (generation seconds "
        "over wall seconds from the first step to the last log) does not include it",
        "",
        "| sequences | ms/step (each repeat) | median ms/step |",
        "|---|---|---|",
        *(f"| {name} | {', '.join(f'{t * 1000:.1f}' for t in times[name])} | "
          f"{statistics.median(times[name]) * 1000:.1f} |" for name in sources),
        "",
        f"**generation share of an on-policy step: {statistics.median(shares):.2f}** (each repeat: "
        f"{', '.join(f'{s:.2f}' for s in shares)}; mean response {statistics.median(lengths):.1f} tokens); "
        f"step time on_policy / dataset: {on / base:.2f}",
        "",
    ])
    write_report(RESULTS, report)


if __name__ == "__main__":
    main()
