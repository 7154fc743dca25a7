"""Server-teacher benchmark: training step time with `xkd.teacher.source: server` (against
`axolotl xkd serve-teacher` on loopback) as a ratio to `source: precomputed` (the same teacher's top-k
stored by `axolotl xkd precompute`), measured in the same run, runs alternating.

    python -m benchmarks.server_teacher [--steps 30] [--top-k 20] [--repeats 2] [--prefetch 2] [--concurrency 4]
        [--server-threads 1]

Builds the tiny assets in code (axolotl_xkd.tiny; nothing is downloaded). Step time = the trainer's
train_runtime / steps (model loading and data preparation excluded). Writes
benchmarks/results/server_teacher.md and prints it.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import write_report
from benchmarks.harness import base_config, merged, run_cli, serve_teacher, train, write_config

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "benchmarks" / "results" / "server_teacher.md"


def step_seconds(output: str, steps: int) -> float:
    """train_runtime / steps, from the metrics line the trainer prints at the end of `axolotl train`."""
    runtimes = re.findall(r"'train_runtime': '?([0-9.]+)", output)
    if not runtimes:
        raise RuntimeError(f"no train_runtime in the output of axolotl train:\n{output[-3000:]}")
    return float(runtimes[-1]) / steps


def timing_setup(prefix: str, steps: int, micro_batch_size: int) -> tuple[Path, dict, dict]:
    """(scratch folder, tiny assets built in it, base config) for step-time runs of `steps` steps with one log
    line and one checkpoint each."""
    from axolotl_xkd.tiny import build_all

    work = Path(tempfile.mkdtemp(prefix=prefix))
    assets = build_all(work / "tiny", teacher_steps=100)
    config = merged(base_config(assets, work / "prep"), {
        "max_steps": steps, "save_steps": steps, "gradient_accumulation_steps": 1,
        "micro_batch_size": micro_batch_size, "logging_steps": steps,
    })
    return work, assets, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--server-threads", type=int, default=1, help="serve-teacher --num-threads")
    args = parser.parse_args()
    import torch

    from axolotl_xkd import __version__

    work, assets, config = timing_setup("xkd_server_bench_", args.steps, args.micro_batch_size)
    store = work / "topk"
    run_cli(["axolotl", "xkd", "precompute", str(write_config(work / "precompute.yml", config)), "--out", str(store),
             "--top-k", str(args.top_k), "--teacher", str(assets["teacher"])])
    times: dict[str, list[float]] = {"precomputed": [], "server": []}
    with serve_teacher(assets["teacher"], "--num-threads", str(args.server_threads)) as url:
        teachers = {
            "precomputed": {"source": "precomputed", "path": str(store)},
            "server": {"source": "server", "base_url": url, "top_k": args.top_k, "prefetch": args.prefetch,
                       "concurrency": args.concurrency, "timeout_s": 60},
        }
        for r in range(args.repeats):
            for name, teacher in teachers.items():
                out = work / f"{name}-{r}"
                run = merged(config, {"output_dir": str(out / "model"), "dataset_prepared_path": str(out / "prep")})
                run["xkd"]["teacher"] = teacher
                proc = train(write_config(out / "cfg.yml", run))
                times[name].append(step_seconds(proc.stdout + proc.stderr, args.steps))
                print(f"{name} repeat {r}: {times[name][-1] * 1000:.1f} ms/step", flush=True)
    pre, srv = statistics.median(times["precomputed"]), statistics.median(times["server"])
    command = "python -m benchmarks.server_teacher " + " ".join(sys.argv[1:])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = "\n".join([
        "# Server teacher benchmark",
        "",
        f"`{command.strip()}`",
        "",
        f"- date {datetime.now(UTC).isoformat(timespec='seconds')}, axolotl_xkd {__version__}, "
        f"torch {torch.__version__}, device {device}, {platform.processor() or platform.machine()}",
        f"- tiny Llama student and teacher (axolotl_xkd.tiny), micro_batch_size {args.micro_batch_size}, "
        f"sequence_len {config['sequence_len']}, {args.steps} steps per run, top_k {args.top_k}; server: "
        f"`axolotl xkd serve-teacher --num-threads {args.server_threads}` on 127.0.0.1 (same machine), "
        f"prefetch {args.prefetch}, "
        f"concurrency {args.concurrency}",
        "- step time = train_runtime / steps, median of the repeats (runs alternate precomputed, server)",
        "",
        "| source | ms/step (each repeat) | median ms/step |",
        "|---|---|---|",
        f"| precomputed | {', '.join(f'{t * 1000:.1f}' for t in times['precomputed'])} | {pre * 1000:.1f} |",
        f"| server | {', '.join(f'{t * 1000:.1f}' for t in times['server'])} | {srv * 1000:.1f} |",
        "",
        f"**ratio server / precomputed: {srv / pre:.2f}** (aim: <= 1.2 when the server keeps up)",
        "",
    ])
    write_report(RESULTS, report)


if __name__ == "__main__":
    main()
