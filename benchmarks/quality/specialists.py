"""Many teachers (issue 34, item 5): two specialists that each know half of a task, distilled into one student. One
command, on the CPU, resumable (each finished run is appended to runs.csv at once; a rerun trains what it lacks):

    python -m benchmarks.quality.specialists [--arms ...] [--seeds 3] [--steps 300] [--threads 1]

Protocol, fixed before the runs:

- Task: tasks.arithmetic_split, arithmetic_v2's worked two-step format with its two halves told apart by the second
  operation: additions `3+4+9=` -> `3+4=07,07+9=16` (teacher "add") and subtractions `3+4-2=` -> `3+4=07,07-2=05`
  (teacher "sub"; the subtracted digit at most a+b, so no number is negative). Each row carries its half's teacher
  name in a raw `teacher` column (the `route` arm's xkd.route_column). 2000 training rows and 200 held-out prompts
  (Task.splits, seed 0; the halves fall as the draw gives them, about 50/50). Metric: exact match of the final
  number, greedy, on the add half, the sub half and the whole held-out set.
- Specialists: the study's teacher body (hidden 128, 2 layers, seed 0, 1500 steps of 64 rows, lr 3e-3,
  tiny.train_teacher), each trained ONLY on its half of the training rows; cached under --work with their scores.
- Student: study.py's arithmetic_v2 student (hidden 64, 2 layers, seed 1, the character tokenizer), --steps
  optimizer steps of 32 rows (default 300: 150 steps per half, what arithmetic_v2's 150 steps give its one task),
  lr 3e-3 constant, through the real `axolotl train` and the plugin, seeds 0..--seeds-1, one run at a time.
- Arms (the same student, steps and rows): `sft` (labels only, teacher null; study.METHODS["sft"]); `add_only` and
  `sub_only` (GKD from one specialist on all rows: forward KL, reward terms off, the one-teacher `xkd.teacher`);
  `route`, `weighted`, `confidence` (both specialists under `xkd.teachers`, the same GKD settings; `route` by the
  `teacher` column, `weighted` at equal weights, `confidence` with score `logprob` at temperature 1).
- Targets (issue 34): on each half, `route` and `confidence` at least 0.95x the mean of the student distilled from
  that half's specialist alone (`add_only` on add, `sub_only` on sub); on the whole held-out set, each ahead of
  every single-teacher student beyond seed spread (stats.clears); `confidence` within seed spread of `route` (neither
  clears the other).

Writes runs.csv and table.md under --out (default benchmarks/results/quality/specialists); --report-only rewrites
table.md from runs.csv. Each row records the code it ran (`code`: the checkout's commit, `+dirty` where axolotl_xkd/
had uncommitted changes). A run that fails is logged under --work/errors/ and the rest of its arm is skipped.

A second budget, chosen after the 300-step results (not part of the fixed protocol): the same arms and seeds at 600
steps, to see whether the per-half gap to the single-teacher students is the budget's (at 300 steps the students
that must learn both operations, sft included, stay far below a student that learns one):

    python -m benchmarks.quality.specialists --seeds 3 --steps 600 --out benchmarks/results/quality/specialists/steps600

At 600 steps sft reaches the specialists on the add half, so that budget leaves distillation little room; 300 steps
is the study's budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import log_history, run_cli, write_config  # sets the offline env first
from benchmarks.quality import study
from benchmarks.quality.stats import Summary, clears, ratio, summary
from benchmarks.quality.tasks import TASKS

TASK = TASKS["arithmetic_split"]
HALVES = ("add", "sub")
SETS = (*HALVES, "all")  # the held-out sets scored: each half and the whole
ROUTE_COLUMN = "teacher"  # the raw column of each row's specialist (tasks.arithmetic_split)
SETTINGS = {"train_rows": 2000, "eval_rows": 200, "teacher_hidden": study.TASK_DEFAULTS["teacher_hidden"],
            "teacher_steps": study.TASK_DEFAULTS["teacher_steps"],
            "student_hidden": study.TASK_SETTINGS["arithmetic_v2"]["student_hidden"]}
GKD = {"divergence": "forward_kl", **study.REWARD_OFF}  # study.py's gkd_fkl_off
SINGLE = {h: f"{h}_only" for h in HALVES}  # the single-teacher arm of each specialist
MIXTURES = ("route", "weighted", "confidence")
ARMS = ("sft", *SINGLE.values(), *MIXTURES)
MIXED = ("route", "confidence")  # the arms with targets
HALF_RATIO = 0.95
FIELDS = ["arm", "seed", "steps", *(f"metric_{s}" for s in SETS), "train_seconds", "distill", "teacher_logs",
          "code"]


def arms(teachers: dict[str, Path]) -> dict[str, dict]:
    """Arm name -> its `xkd:` block (merged into harness.base_config's; None removes a key)."""
    table = {"sft": study.METHODS["sft"]}
    table |= {SINGLE[h]: {**GKD, "teacher": {"source": "model", "path": str(teachers[h])}} for h in HALVES}
    several = {**GKD, "teacher": None,
               "teachers": [{"name": h, "source": "model", "path": str(teachers[h])} for h in HALVES]}
    table["route"] = {**several, "mixture": "route", "route_column": ROUTE_COLUMN}
    table["weighted"] = {**several, "mixture": "weighted"}
    table["confidence"] = {**several, "mixture": "confidence", "confidence_score": "logprob",
                           "confidence_temperature": 1.0}
    return table


# ---- data and specialists ----------------------------------------------------------------------------------


def held_out(data: Path) -> dict[str, list[dict]]:
    """The held-out rows of each set in SETS (eval.jsonl, split by the rows' `teacher`)."""
    rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()]
    return {**{h: [r for r in rows if r[ROUTE_COLUMN] == h] for h in HALVES}, "all": rows}


def scores(model_dir: Path, sets: dict[str, list[dict]]) -> dict[str, float]:
    """Greedy exact match of a saved model on each held-out set."""
    return {name: study.evaluate(model_dir, TASK, rows, samples=0)["metric"] for name, rows in sets.items()}


def prepare(work: Path) -> tuple[dict[str, Path], dict]:
    """The data files, the untrained student and the two specialists (cached in `work`, keyed by SETTINGS): their
    paths (harness.base_config's assets plus one per half) and the specialists' record (seconds, loss, scores)."""
    import torch

    from axolotl_xkd.tiny import build_model, build_tokenizer, train_teacher, write_jsonl

    paths = {"data": work / "data", "student": work / "student", "tokenizer": work / "student",
             **{h: work / f"teacher_{h}" for h in HALVES}}
    paths["teacher"] = paths[HALVES[0]]  # base_config's default teacher; every arm sets its own
    stamp = work / "assets.json"
    if stamp.is_file() and (info := json.loads(stamp.read_text())).get("settings") == SETTINGS:
        return paths, info
    train, evaluation = TASK.splits(SETTINGS["train_rows"], SETTINGS["eval_rows"], seed=0)
    write_jsonl(paths["data"] / "train.jsonl", train)
    write_jsonl(paths["data"] / "eval.jsonl", evaluation)
    sets = held_out(paths["data"])
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden=SETTINGS["student_hidden"], layers=2, seed=1).save_pretrained(paths["student"])
    tokenizer.save_pretrained(paths["student"])
    info = {"settings": SETTINGS, "rows": {"train": {h: sum(r[ROUTE_COLUMN] == h for r in train) for h in HALVES},
                                           "held_out": {s: len(rows) for s, rows in sets.items()}}}
    for h in HALVES:
        torch.manual_seed(0)
        teacher = build_model(tokenizer, hidden=SETTINGS["teacher_hidden"], layers=2, seed=0)
        started = time.perf_counter()
        loss = train_teacher(teacher, tokenizer, [r for r in train if r[ROUTE_COLUMN] == h],
                             steps=SETTINGS["teacher_steps"], seed=0)
        seconds = round(time.perf_counter() - started, 1)
        teacher.save_pretrained(paths[h])
        tokenizer.save_pretrained(paths[h])
        info[h] = {"loss": round(loss, 4), "seconds": seconds, **scores(paths[h], sets)}
        print(f"specialist {h}: {SETTINGS['teacher_steps']} steps in {seconds:.0f} s, loss {loss:.3f}, exact match "
              + ", ".join(f"{s} {info[h][s]:.1f}" for s in SETS), flush=True)
    stamp.write_text(json.dumps(info, indent=1))
    return paths, info


# ---- runs --------------------------------------------------------------------------------------------------


def code_version() -> str:
    """The checkout's commit, with `+dirty` where axolotl_xkd/ has uncommitted changes."""
    git = [["git", "rev-parse", "--short", "HEAD"], ["git", "status", "--porcelain", "axolotl_xkd"]]
    head, dirty = (subprocess.run(c, check=False, capture_output=True, text=True, cwd=study.REPO).stdout.strip()
                   for c in git)
    return head + ("+dirty" if dirty else "")


def train_arm(paths: dict[str, Path], work: Path, arm: str, xkd: dict, seed: int, args: argparse.Namespace) -> dict:
    """One student through `axolotl train`, scored on each held-out set; its weights deleted; its runs.csv row (with
    the xkd/teacher/* metrics of the last logging step, as JSON)."""
    out = work / "runs" / f"{arm}-seed{seed}"
    config = study.student_config(TASK, paths, out, "train.jsonl", seed=seed, steps=args.steps, xkd=xkd)
    code = code_version()
    started = time.perf_counter()
    run_cli(["axolotl", "train", str(write_config(out / "cfg.yml", config))],
            env={"OMP_NUM_THREADS": str(args.threads)})
    seconds = round(time.perf_counter() - started, 1)
    model = Path(config["output_dir"])
    last = [e for e in log_history(model) if "loss" in e][-1]
    metrics = scores(model, held_out(paths["data"]))
    shutil.rmtree(out, ignore_errors=True)
    return {"arm": arm, "seed": seed, "steps": args.steps, **{f"metric_{s}": v for s, v in metrics.items()},
            "train_seconds": seconds, "distill": round(last.get("xkd/distill", 0.0), 4),
            "teacher_logs": json.dumps({k: round(v, 4) for k, v in last.items() if k.startswith("xkd/teacher/")}),
            "code": code}


def run(todo: list[tuple[str, int]], table: dict[str, dict], paths: dict[str, Path], args: argparse.Namespace,
        csv_path: Path) -> dict[str, str]:
    """Train `todo` ((arm, seed) pairs) one at a time, appending each row to `csv_path` as it finishes. A run that
    fails writes its error to --work/errors/<arm>-seed<seed>.txt and the arm's other seeds are skipped; returns
    arm -> that file."""
    failed: dict[str, str] = {}
    for n, (arm, seed) in enumerate(todo, 1):
        if arm in failed:
            continue
        started = time.perf_counter()
        try:
            row = train_arm(paths, args.work, arm, table[arm], seed, args)
        except AssertionError as error:  # harness.run_cli: the command's exit status and its output's tails
            log = args.work / "errors" / f"{arm}-seed{seed}.txt"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(str(error))
            failed[arm] = str(log)
            print(f"[{n}/{len(todo)}] {arm} seed {seed} FAILED ({log}):\n{str(error)[-3000:]}", flush=True)
            continue
        new = not csv_path.is_file()
        with csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(f"[{n}/{len(todo)}] {arm} seed {seed}: " + ", ".join(f"{s} {row[f'metric_{s}']:.1f}" for s in SETS)
              + f" ({time.perf_counter() - started:.0f} s, train {row['train_seconds']:.0f} s)", flush=True)
    return failed


# ---- report ------------------------------------------------------------------------------------------------


def summaries(runs: list[dict]) -> dict[tuple[str, str], Summary]:
    """(arm, held-out set or "seconds") -> the metric's (or the train seconds') summary over the arm's seeds."""
    columns = {s: f"metric_{s}" for s in SETS} | {"seconds": "train_seconds"}
    return {(a, s): summary([float(r[c]) for r in runs if r["arm"] == a])
            for a in dict.fromkeys(r["arm"] for r in runs) for s, c in columns.items()}


def targets(stats: dict[tuple[str, str], Summary]) -> list[str]:
    """The issue's three targets, each met / missed with its figures, or pending where an arm has no runs."""
    def pending(*names: str) -> str:
        return "pending (no runs of " + ", ".join(a for a in names if (a, "all") not in stats) + ")"

    lines = []
    for arm in MIXED:
        for h in HALVES:
            name = f"{arm} on the {h} half >= {HALF_RATIO}x {SINGLE[h]}'s"
            if (arm, h) not in stats or (SINGLE[h], h) not in stats:
                lines.append(f"- {name}: {pending(arm, SINGLE[h])}.")
                continue
            mine, reference = stats[(arm, h)], stats[(SINGLE[h], h)]
            share = ratio(mine.mean, reference.mean)
            lines.append(f"- {name}: **{'met' if share >= HALF_RATIO else 'missed'}**: {mine} / {reference} = "
                         f"{share:.2f}.")
    for arm in MIXED:
        for single in SINGLE.values():
            name = f"{arm} on the whole set ahead of {single} beyond seed spread"
            if (arm, "all") not in stats or (single, "all") not in stats:
                lines.append(f"- {name}: {pending(arm, single)}.")
                continue
            mine, reference = stats[(arm, "all")], stats[(single, "all")]
            lines.append(f"- {name}: **{'met' if clears(mine, reference) else 'missed'}**: {mine} vs {reference} "
                         f"(mean - std {mine.mean - mine.std:.1f} against mean + std "
                         f"{reference.mean + reference.std:.1f}).")
    name = "confidence within seed spread of route (on the whole set, neither clears the other)"
    if ("confidence", "all") in stats and ("route", "all") in stats:
        confidence, route = stats[("confidence", "all")], stats[("route", "all")]
        within = not clears(confidence, route) and not clears(route, confidence)
        lines.append(f"- {name}: **{'met' if within else 'missed'}**: {confidence} vs {route}.")
    else:
        lines.append(f"- {name}: {pending('confidence', 'route')}.")
    return lines


def failure(work: Path, arm: str) -> str | None:
    """The last error line of the newest failed run of `arm` under work/errors/, with the file's name; None if none."""
    logs = sorted((work / "errors").glob(f"{arm}-seed*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    lines = [line.strip() for line in logs[-1].read_text().splitlines() if line.strip()]
    # The training process's own exception, not the launchers' CalledProcessError that follows it (pydantic puts
    # the message on the line after its header).
    errors = [n for n, line in enumerate(lines) if ("Error" in line or "Exception" in line) and ":" in line
              and "CalledProcessError" not in line and not line.startswith(("File ", "Traceback"))]
    if not errors:
        return f"see {logs[-1].name}"
    n = errors[-1]
    text = lines[n] + (" " + lines[n + 1] if "validation error" in lines[n] and n + 1 < len(lines) else "")
    return f"`{text[:600]}` ({logs[-1].name})"


def report(runs: list[dict], info: dict, work: Path, command: str) -> str:
    """table.md: the protocol, the specialists, mean ± std per arm on each half and the whole set, the targets, the
    per-teacher logs of the mixture arms, the code each arm ran and the arms that failed."""
    stats = summaries(runs)
    shown = [a for a in ARMS if (a, "all") in stats]
    protocol = __doc__.split("Protocol, fixed before the runs:")[1].split("Writes runs.csv")[0].strip()
    lines = ["# Many teachers: two specialists, one student (arithmetic_split, CPU)", "",
             f"`{command}`. Mean ± sample std over seeds (n = seeds), greedy decoding, exact match in %, "
             f"{len(runs)} runs. Held-out prompts: " + ", ".join(f"{s} {n}" for s, n in info["rows"]["held_out"].items())
             + "; training rows: " + ", ".join(f"{h} {n}" for h, n in info["rows"]["train"].items()) + ".", "",
             "## Protocol (fixed before the runs)", "", protocol, "",
             "## The specialists", "",
             "Each trained only on its half; exact match on each held-out set.", "",
             "| specialist | add half | sub half | whole | training s | final loss |", "|---|---|---|---|---|---|"]
    lines += [f"| {h} | " + " | ".join(f"{info[h][s]:.1f}" for s in SETS) + f" | {info[h]['seconds']:.0f} | "
              f"{info[h]['loss']:.3f} |" for h in HALVES]
    if ("sft", "all") in stats:
        lines += ["", "Room for distillation: sft's mean against the half's specialist: " + "; ".join(
            f"{h} half {stats[('sft', h)].mean:.1f} vs {info[h][h]:.1f}" for h in HALVES) + "."]
    lines += ["", "## Students", "", "| arm | add half | sub half | whole | train s (mean) | code |",
              "|---|---|---|---|---|---|"]
    for a in shown:
        code = ", ".join(sorted({r["code"] for r in runs if r["arm"] == a}))
        lines.append(f"| {a} | " + " | ".join(f"{stats[(a, s)]} (n={stats[(a, s)].n})" for s in SETS)
                     + f" | {stats[(a, 'seconds')].mean:.0f} | {code} |")
    lines += ["", "## Targets", "", *targets(stats)]
    logged = {a: [json.loads(r["teacher_logs"]) for r in runs if r["arm"] == a and r["teacher_logs"] not in ("", "{}")]
              for a in shown}
    if any(logged.values()):
        lines += ["", "## Per-teacher logs (xkd/teacher/*, last logging step, mean over seeds)", ""]
        for a, entries in logged.items():
            keys = dict.fromkeys(k for e in entries for k in e)
            if keys:
                lines.append(f"- {a}: " + ", ".join(
                    f"{k} {summary([e[k] for e in entries if k in e]).mean:.3f}" for k in keys))
    failed = {a: f for a in ARMS if a not in shown and (f := failure(work, a))}
    if failed:
        lines += ["", "## Arms that failed (no runs)", ""]
        lines += [f"- {a}: {f}" for a, f in failed.items()]
    missing = [a for a in ARMS if a not in shown and a not in failed]
    if missing:
        lines += ["", "Not run yet: " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


# ---- driver ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="default: all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per student (micro batch 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (runs go one at a time)")
    parser.add_argument("--work", type=Path, default=study.REPO / "runs" / "specialists")
    parser.add_argument("--out", type=Path, default=study.REPO / "benchmarks" / "results" / "quality" / "specialists")
    parser.add_argument("--report-only", action="store_true", help="rewrite table.md from runs.csv only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "runs.csv"
    paths, info = prepare(args.work)
    if not args.report_only:
        done = {(r["arm"], int(r["seed"])) for r in study.read_runs(csv_path)}
        todo = [(a, s) for s in range(args.seeds) for a in args.arms if (a, s) not in done]  # seed-major
        run(todo, arms(paths), paths, args, csv_path)
    command = ("python -m benchmarks.quality.specialists " + " ".join(
        a for a in sys.argv[1:] if a != "--report-only")).strip()
    text = report(study.read_runs(csv_path), info, args.work, command)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
