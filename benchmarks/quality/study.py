"""Quality study: does X-KD beat GKD, SeqKD and SFT? One command, on the CPU, deterministic and resumable.

    python -m benchmarks.quality.study [--seeds 3] [--steps 150] [--jobs 2] [--tasks ...] [--methods ...]

Per task (benchmarks/quality/tasks.py) it trains a teacher once (cached under --work), stores the
teacher's generations for the sequence-level arms (`axolotl xkd precompute --generate`), then trains
the same tiny student with every method for the same number of steps through the real `axolotl train`
and the plugin (SFT and GKD are X-KD with the reward terms off, so only the method changes), for each
seed, on all the data and (the data-efficiency arm) on 10% of it. Each student is scored on held-out
prompts (greedy decoding) and, for diversity, on n samples per prompt at temperature 1 (distinct-2 over
tokens, self-BLEU between a prompt's samples). Every finished run is appended to runs.csv at once, so an
interrupted study continues where it stopped. Writes, under --out: runs.csv, table.md, quality_diversity.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from axolotl_xkd.options import COUPLED_FORM
from benchmarks.harness import base_config, log_history, merged, run_cli, write_config  # sets the offline env first
from benchmarks.quality.evaluation import diversity, generate, load
from benchmarks.quality.names import LONG
from benchmarks.quality.stats import Summary, clears, summary
from benchmarks.quality.tasks import STUDY_TASKS, TASKS, Task

REPO = Path(__file__).resolve().parents[2]

SEQUENCE_LEN = 48
MAX_NEW_TOKENS = 32
REWARD_OFF = {"reward_kl_weight": 0.0, "td_weight": 0.0}
# The spec's X-KD, pinned: TD_i on the student's Q, the head's gradient in its body (not the plugin's defaults).
AVRIL = {"q_form": "logits", "reward_kl_weight": 1.0, "td_weight": 1.0, "gamma": 1.0, **COUPLED_FORM}
ON_POLICY = {"sequences": "on_policy", "on_policy_fraction": 0.5,
             "generation": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0}}
STUDY_DIVERGENCES = {short: LONG[short] for short in ("fkl", "rkl", "jsd")}
DEV_ROWS = 100
# A task's data and model sizes: these defaults, then the task's own (TASK_SETTINGS), then the command line's.
TASK_DEFAULTS = {"train_rows": 2000, "eval_rows": 100, "teacher_steps": 1500, "teacher_hidden": 128,
                 "student_hidden": 32}
# arithmetic_v2 (docs/arithmetic_v2.md): a hidden-64 student (84k parameters, 3.8x fewer than the teacher's 316k);
# the hidden-32 one stayed near 26% exact match after 150 steps.
TASK_SETTINGS: dict[str, dict] = {"arithmetic_v2": {"student_hidden": 64}}
TEACHER_SEQUENCES = "TEACHER_SEQUENCES"  # replaced by the task's `precompute --generate` store
FRACTIONS = (0.1, 0.3)  # the data-efficiency arms' shares of the training rows


def methods() -> dict[str, dict]:
    """Method name -> `xkd:` overrides. GKD = X-KD with w_kl = lambda = 0; SFT = CE on the gold data only."""
    table: dict[str, dict] = {
        "sft": {"alpha_kd": 0.0, "alpha_ce": 1.0, **REWARD_OFF, "teacher": None},
        "seqkd": {"sequences": "teacher", "divergence": "sequence", **REWARD_OFF, "teacher": TEACHER_SEQUENCES},
        "xkd_seqkd": {"sequences": "teacher", "divergence": "sequence", **AVRIL, "teacher": TEACHER_SEQUENCES},
    }
    for short, divergence in STUDY_DIVERGENCES.items():
        for source, extra in (("off", {}), ("on", ON_POLICY)):
            table[f"gkd_{short}_{source}"] = {"divergence": divergence, **REWARD_OFF, **extra}
            table[f"xkd_{short}_{source}"] = {"divergence": divergence, **AVRIL, **extra}
    # The plugin's defaults, pinned (docs/defaults.md): forward KL off-policy; the reward head learns the teacher's
    # log-probs on detached states, so the student trains as gkd_fkl_off's does.
    table["xkd_default"] = {"divergence": "forward_kl", "q_form": "ava", "td_weight": 0.1, "reward_kl_weight": 0.1,
                            "td_target": "teacher_logprob", "reward_detach_backbone": True}
    # The previous defaults (until 2026-11-30), pinned: the same weights with the TD term on the student's Q.
    table["xkd_coupled"] = {**table["xkd_default"], **COUPLED_FORM}
    # The reranking benchmark's dev pick (benchmarks/results/rerank.md), coupled: TD_i = Q(s_i, a_i) - gamma V(s'_i).
    table["xkd_soft"] = {**table["xkd_coupled"], "td_target": "soft"}
    return table


METHODS = methods()
LATER_ARMS = ("xkd_default", "xkd_coupled", "xkd_soft")  # added after the published study, run by name
STUDY_METHODS = [m for m in METHODS if m not in LATER_ARMS]  # the published study's arms (scripts/quality.sh)
LOGGED = ["distill", "td_nll", "reward_sigma"]  # the trainer's xkd/* metrics at the last logging step
FIELDS = ["task", "method", "seed", "data_fraction", "metric_name", "metric", "distinct2", "self_bleu",
          "steps", "train_seconds", *LOGGED]


# ---- per task: data, teacher, teacher generations --------------------------------------------------


def task_settings(task: str, args: argparse.Namespace) -> dict:
    """`task`'s train_rows, eval_rows, teacher_steps, teacher_hidden and student_hidden: TASK_DEFAULTS, then
    TASK_SETTINGS[task], then the options given on the command line (those left at None do not count)."""
    given = {k: getattr(args, k) for k in TASK_DEFAULTS if getattr(args, k, None) is not None}
    return {**TASK_DEFAULTS, **TASK_SETTINGS.get(task, {}), **given}


def asset_paths(task: str, work: Path) -> dict[str, Path]:
    """Where prepare_task keeps the task's tokenizer, teacher, untrained student and data files."""
    return {name: work / task / name for name in ("tokenizer", "teacher", "student", "data")}


def prepare_task(task: Task, work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Data files, tokenizer, the trained teacher and the untrained student of `task` (cached in `work`)."""
    import torch

    from axolotl_xkd.tiny import build_model, build_tokenizer, train_teacher, write_jsonl

    stamp = work / task.name / "assets.json"
    settings = task_settings(task.name, args)
    paths = asset_paths(task.name, work)
    write_jsonl(paths["data"] / "dev.jsonl", dev_rows(task, settings["train_rows"], settings["eval_rows"]))
    train, evaluation = task.splits(settings["train_rows"], settings["eval_rows"], seed=0)
    for fraction in FRACTIONS:  # the data-efficiency arms' subsets: the first rows of the training split
        write_jsonl(paths["data"] / data_file(fraction), train[: max(1, len(train) * round(100 * fraction) // 100)])
    if stamp.is_file() and json.loads(stamp.read_text()).get("settings") == settings:
        return paths
    write_jsonl(paths["data"] / "train.jsonl", train)
    write_jsonl(paths["data"] / "eval.jsonl", evaluation)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(paths["tokenizer"])
    torch.manual_seed(0)
    teacher = build_model(tokenizer, hidden=settings["teacher_hidden"], layers=2, seed=0)
    started = time.perf_counter()
    loss = train_teacher(teacher, tokenizer, train, steps=settings["teacher_steps"], seed=0)
    seconds = time.perf_counter() - started
    teacher.save_pretrained(paths["teacher"])
    tokenizer.save_pretrained(paths["teacher"])
    student = build_model(tokenizer, hidden=settings["student_hidden"], layers=2, seed=1)
    student.save_pretrained(paths["student"])
    tokenizer.save_pretrained(paths["student"])
    score = evaluate(paths["teacher"], task, evaluation, samples=0)["metric"]
    stamp.write_text(json.dumps({"settings": settings, "teacher_loss": loss, "teacher_metric": score,
                                 "teacher_seconds": round(seconds, 1)}))
    print(f"{task.name}: teacher trained ({settings['teacher_steps']} steps in {seconds:.0f} s, loss {loss:.3f}), "
          f"held-out {task.metric_name} {score:.1f}", flush=True)
    return paths


def data_file(fraction: float) -> str:
    """The training file of a data fraction: train.jsonl, or train_<percent>pct.jsonl (its first rows)."""
    return "train.jsonl" if fraction == 1.0 else f"train_{round(100 * fraction)}pct.jsonl"


def dev_rows(task: Task, train_rows: int, eval_rows: int) -> list[dict]:
    """DEV_ROWS rows whose prompts are in neither the training nor the eval split: the sweep tunes on these.
    They continue the training split's random stream, so the training rows stay exactly as they were."""
    rows, _ = task.splits(train_rows + 4 * DEV_ROWS, eval_rows, seed=0)
    seen = {r["prompt"] for r in rows[:train_rows]}
    dev: dict[str, dict] = {}
    for row in rows[train_rows:]:
        if row["prompt"] not in seen:
            dev.setdefault(row["prompt"], row)
    return list(dev.values())[:DEV_ROWS]


def teacher_store(task: Task, assets: dict[str, Path], data_file: str, work: Path) -> Path:
    """The teacher's greedy answers to the training prompts of `data_file`, with top-k (precompute --generate)."""
    store = work / task.name / f"teacher_sequences_{Path(data_file).stem}"
    if (store / "manifest.json").is_file():
        return store
    config = student_config(task, assets, work / task.name / "precompute", data_file, seed=0, steps=1,
                            xkd={"sequences": "teacher", "divergence": "sequence", "generation":
                                 {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0},
                                 "teacher": {"source": "precomputed", "path": str(store),
                                             "model_path": str(assets["teacher"])}})
    run_cli(["axolotl", "xkd", "precompute", str(write_config(store.parent / "precompute.yml", config)),
             "--top-k", "16", "--batch-size", "64"])
    return store


# ---- one run ---------------------------------------------------------------------------------------


def student_config(task: Task, assets: dict[str, Path], out: Path, data_file: str, *, seed: int, steps: int,
                   xkd: dict) -> dict:
    """benchmarks/harness.base_config for this task's student and `data_file`, with `xkd` merged into its block."""
    config = base_config(assets, out)
    config["datasets"][0]["path"] = str(assets["data"] / data_file)
    return merged(config, {
        "xkd": xkd, "sequence_len": SEQUENCE_LEN, "micro_batch_size": 32, "gradient_accumulation_steps": 1,
        "max_steps": steps, "num_epochs": 1000, "save_steps": steps, "logging_steps": max(1, steps // 5),
        "seed": seed, "dataset_prepared_path": str(out / "prepared"),
    })


def train_one(task: Task, assets: dict[str, Path], work: Path, method: str, seed: int, fraction: float,
              args: argparse.Namespace, *, xkd: dict | None = None, split: str = "eval", dev_too: bool = False,
              logged: list[str] = LOGGED, history: Path | None = None,
              temperatures: tuple[float, ...] = ()) -> dict:
    """Train one student with `axolotl train`, score it on `split` (eval: the test prompts; dev: the tuning
    prompts) and, with dev_too, greedily on dev as `dev_metric`; delete its weights; returns its CSV row with
    the `logged` X-KD metrics of the last logging step. history: a JSON-lines file that gets the run's whole log
    (every logging step's loss and xkd/* metrics) as one line. temperatures: also sample args.samples responses
    per `split` prompt at each and score them (`sampled`, the CSV's `sampled` column as JSON)."""
    import shutil

    data = data_file(fraction)
    xkd = json.loads(json.dumps(METHODS[method] if xkd is None else xkd))
    if xkd.get("teacher") == TEACHER_SEQUENCES:
        xkd["teacher"] = {"source": "precomputed", "path": str(teacher_store(task, assets, data, work))}
    elif "teacher" not in xkd:
        xkd["teacher"] = {"source": "model", "path": str(assets["teacher"])}
    out = work / task.name / "runs" / f"{method}-seed{seed}-data{fraction:g}"
    config = student_config(task, assets, out, data, seed=seed, steps=args.steps, xkd=xkd)
    started = time.perf_counter()
    env = {"OMP_NUM_THREADS": str(args.threads)}
    run_cli(["axolotl", "train", str(write_config(out / "cfg.yml", config))], env=env)
    seconds = time.perf_counter() - started
    evaluation = [json.loads(line) for line in (assets["data"] / f"{split}.jsonl").read_text().splitlines()]
    scores = evaluate(Path(config["output_dir"]), task, evaluation, samples=args.samples, seed=seed)
    if temperatures:
        scores["sampled"] = json.dumps(sampled(Path(config["output_dir"]), task, evaluation, samples=args.samples,
                                              temperatures=temperatures, seed=seed))
    if dev_too:
        dev = [json.loads(line) for line in (assets["data"] / "dev.jsonl").read_text().splitlines()]
        scores["dev_metric"] = evaluate(Path(config["output_dir"]), task, dev, samples=0)["metric"]
    steps = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
    shutil.rmtree(out, ignore_errors=True)
    if history is not None:
        with history.open("a") as f:
            f.write(json.dumps({"task": task.name, "method": method, "seed": seed, "data_fraction": fraction,
                                "log": steps}) + "\n")
    return {"task": task.name, "method": method, "seed": seed, "data_fraction": fraction,
            "metric_name": task.metric_name, **scores, "steps": args.steps, "train_seconds": round(seconds, 1),
            **{k: round(steps[-1][f"xkd/{k}"], 4) for k in logged if f"xkd/{k}" in steps[-1]}}


def evaluate(model_dir: Path, task: Task, rows: list[dict], *, samples: int, seed: int = 0) -> dict:
    """Greedy metric on `rows`; with samples > 0 also distinct-2 and self-BLEU of that many samples per prompt."""
    model, tokenizer = load(model_dir)
    prompts = [r["prompt"] for r in rows]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, max_length=SEQUENCE_LEN)
    result = {"metric": round(task.metric(greedy, [r["response"] for r in rows]), 3), "distinct2": "",
              "self_bleu": ""}
    if samples:
        drawn = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, max_length=SEQUENCE_LEN,
                         temperature=1.0, n=samples, seed=seed)
        result.update(diversity(drawn, samples, tokenizer))
    return result


def sampled(model_dir: Path, task: Task, rows: list[dict], *, samples: int, temperatures: tuple[float, ...],
            seed: int = 0) -> dict[str, dict[str, float]]:
    """At each temperature, `samples` responses per prompt: the task metric over all of them against each prompt's
    reference, distinct-2 and self-BLEU (the quality-diversity trade-off), keyed by the temperature as text."""
    model, tokenizer = load(model_dir)
    prompts = [r["prompt"] for r in rows]
    references = [r["response"] for r in rows for _ in range(samples)]
    out = {}
    for temperature in temperatures:
        drawn = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, max_length=SEQUENCE_LEN,
                         temperature=temperature, n=samples, seed=seed)
        out[f"{temperature:g}"] = {"metric": round(task.metric(drawn, references), 3),
                                   **diversity(drawn, samples, tokenizer)}
    return out


# ---- reports ---------------------------------------------------------------------------------------


def read_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def run_all(jobs: list[Callable[[], dict]], csv_path: Path, parallel: int, desc: str,
            fields: list[str] = FIELDS) -> None:
    """Run `jobs` `parallel` at a time, appending each finished row to `csv_path` at once (resumable).
    A file written with other columns is rewritten first with the current `fields` (missing cells empty)."""
    from tqdm.auto import tqdm

    old = read_runs(csv_path)
    if not csv_path.is_file() or (old and list(old[0]) != fields):
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fields, restval="")
            writer.writeheader()
            writer.writerows(old)
    with csv_path.open("a", newline="") as f, ThreadPoolExecutor(parallel) as pool:
        writer = csv.DictWriter(f, fields, restval="")
        for future in tqdm(as_completed([pool.submit(job) for job in jobs]), total=len(jobs), desc=desc, unit="run"):
            writer.writerow(future.result())
            f.flush()


def summarize(runs: list[dict], tasks: list[str]) -> dict[tuple[str, str, float], Summary]:
    """(task, method, data_fraction) -> (mean, sample std, seeds) of the metric."""
    groups: dict[tuple[str, str, float], list[float]] = {}
    for r in runs:
        if r["task"] in tasks:
            groups.setdefault((r["task"], r["method"], float(r["data_fraction"])), []).append(float(r["metric"]))
    return {k: summary(v) for k, v in groups.items()}


def write_table(runs: list[dict], tasks: list[str], path: Path, command: str, teacher: dict[str, float]) -> str:
    """Markdown: mean ± std per method and task (full data and 10%), and X-KD's best against the best baseline."""
    stats = summarize(runs, tasks)
    names = [m for m in METHODS if any(k[1] == m for k in stats)]
    names += sorted({k[1] for k in stats} - set(names))  # arms added by sweep.py
    lines = ["# Quality study (generated tasks, CPU)", "", f"`{command}`, finished "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Mean ± std over seeds (n = seeds); greedy decoding "
             "on held-out prompts. Teacher (held-out): " + ", ".join(f"{t} {v:.1f}" for t, v in teacher.items()), ""]
    for fraction in sorted({k[2] for k in stats}, reverse=True):
        lines += [f"## {fraction:.0%} of the training data", "",
                  "| method | " + " | ".join(f"{t} ({TASKS[t].metric_name})" for t in tasks) + " |",
                  "|---" * (len(tasks) + 1) + "|"]
        for m in names:
            cells = []
            for t in tasks:
                s = stats.get((t, m, fraction))
                cells.append(f"{s[0]:.1f} ± {s[1]:.1f} (n={s[2]})" if s else "")
            if any(cells):
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        for t in tasks:
            ours = {m: stats[(t, m, fraction)] for m in names if m.startswith("xkd") and (t, m, fraction) in stats}
            theirs = {m: stats[(t, m, fraction)] for m in names if not m.startswith("xkd") and (t, m, fraction) in stats}
            if ours and theirs:
                best_ours = max(ours, key=lambda m: ours[m][0])
                best_theirs = max(theirs, key=lambda m: theirs[m][0])
                (mo, so, _), (mt, st, _) = ours[best_ours], theirs[best_theirs]
                verdict = ("X-KD ahead" if clears(ours[best_ours], theirs[best_theirs]) else "X-KD behind"
                           if clears(theirs[best_theirs], ours[best_ours]) else "within spread")
                lines.append(f"- {t}: best X-KD {best_ours} {mo:.1f} ± {so:.1f} vs best baseline {best_theirs} "
                             f"{mt:.1f} ± {st:.1f}: {verdict}")
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text)
    return text


def write_plot(runs: list[dict], tasks: list[str], path: Path) -> None:
    """Quality against diversity (distinct-2), one panel per task, one point per method (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m in dict.fromkeys(r["method"] for r in runs):
            rows = [r for r in runs if r["task"] == t and r["method"] == m and float(r["data_fraction"]) == 1.0
                    and r["distinct2"] != ""]
            if not rows:
                continue
            x = statistics.fmean(float(r["distinct2"]) for r in rows)
            y = statistics.fmean(float(r["metric"]) for r in rows)
            ax.scatter(x, y, marker="o" if m.startswith("xkd") else "x", label=m)
            ax.annotate(m, (x, y), fontsize=6)
        ax.set_title(t)
        ax.set_xlabel("distinct-2 (samples at T=1)")
        ax.set_ylabel(TASKS[t].metric_name + " (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- driver ----------------------------------------------------------------------------------------


def follow_up_parser(description: str) -> argparse.ArgumentParser:
    """The options of every script that trains arms of the study (study.py, sweep.py, trl_baselines.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tasks", nargs="+", default=STUDY_TASKS, choices=list(TASKS),
                        help=f"default: {' '.join(STUDY_TASKS)} (arithmetic_v2: docs/arithmetic_v2.md)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per student (micro batch 32)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt for the diversity measures")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quality")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quality")
    return parser


def parser() -> argparse.ArgumentParser:
    """study.py's options: the shared ones, the arms, and the task settings that the cached teachers depend on."""
    parser = follow_up_parser(__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=STUDY_METHODS, choices=list(METHODS),
                        help=f"default: every arm but {', '.join(LATER_ARMS)}")
    parser.add_argument("--low-data-methods", nargs="*", default=["sft", "gkd_jsd_on", "xkd_jsd_on"],
                        choices=list(METHODS), help="methods of the 10%%-data arm")
    parser.add_argument("--seeds", type=int, default=3)
    for name, default in TASK_DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"every task's (default: {default}, or the task's own in TASK_SETTINGS)")
    return parser


def follow_up_args(follow_up: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed follow-up options plus the study's default task settings (so the cached teachers are reused)."""
    args = follow_up.parse_args()
    defaults = parser().parse_args([])
    for name in TASK_DEFAULTS:
        setattr(args, name, getattr(defaults, name))
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def report(args: argparse.Namespace, runs: list[dict], command: str) -> None:
    """Print and write table.md and quality_diversity.png under args.out from every run in `runs`."""
    teacher = {t: json.loads((args.work / t / "assets.json").read_text())["teacher_metric"] for t in args.tasks}
    print(write_table(runs, args.tasks, args.out / "table.md", command, teacher))
    write_plot(runs, args.tasks, args.out / "quality_diversity.png")


def main() -> None:
    args = parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "runs.csv"
    done = {(r["task"], r["method"], int(r["seed"]), float(r["data_fraction"])) for r in read_runs(csv_path)}
    assets = {t: prepare_task(TASKS[t], args.work, args) for t in args.tasks}
    # Seed-major, so that an interrupted study already has every arm at its first seeds.
    todo = [(t, m, s, f) for s in range(args.seeds) for t in args.tasks for f in (1.0, 0.1)
            for m in (args.methods if f == 1.0 else [x for x in args.low_data_methods if x in args.methods])
            if (t, m, s, f) not in done]
    for t in args.tasks:  # the teacher stores are shared by runs; build them before the parallel runs
        if any(METHODS[m].get("teacher") == TEACHER_SEQUENCES for _, m, _, _ in todo):
            for name in ("train.jsonl", data_file(0.1)):
                teacher_store(TASKS[t], assets[t], name, args.work)
    jobs = [partial(train_one, TASKS[t], assets[t], args.work, m, s, frac, args) for t, m, s, frac in todo]
    run_all(jobs, csv_path, args.jobs, "quality study")
    report(args, read_runs(csv_path), ("python -m benchmarks.quality.study " + " ".join(sys.argv[1:])).strip())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
