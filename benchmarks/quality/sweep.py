"""X-KD variant sweep: which reward weight, gamma, q_form or td_target makes X-KD work here? Tuned on a dev
split, reported on the test split.

    python -m benchmarks.quality.sweep [--seeds 1] [--final-seeds 3] [--jobs 2] [--tasks ...] [--variants ...]
    python -m benchmarks.quality.sweep --base xkd_jsd_on --variants q_ava q_ava_lambda_0.1 lambda_0.1 \
        --final-arms xkd_jsd_on xkd_jsd_off     # the same question for JSD (sweep_xkd_jsd_on.md)

Phase 1 trains the study's X-KD forward-KL off-policy arm with each variant in VARIANTS (and the GKD arm
as the reference) on every task, and scores it on dev.jsonl: prompts held out from both the training and
the test split (study.dev_rows), so nothing is tuned on the test prompts. The chosen variant is the one
with the highest mean, over tasks, of its dev metric divided by GKD's. Phase 2 trains the chosen variant
on the study's X-KD arms in --final-arms (every X-KD arm by default) with the
study's seeds and scores them on the test split, appending to the study's runs.csv as `ARM+VARIANT`, and
rewrites table.md and the plot. Writes sweep.csv and sweep.md beside them;
both phases resume from their CSV.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

from benchmarks.quality import study
from benchmarks.quality.tasks import TASKS

BASE = "xkd_fkl_off"
REFERENCE = "gkd_fkl_off"
FINAL_ARMS = [BASE, "xkd_jsd_on", "xkd_seqkd", *(m for m in study.STUDY_METHODS if m.startswith("xkd_") and m not in
                                                (BASE, "xkd_jsd_on", "xkd_seqkd"))]  # every X-KD arm
VARIANTS: dict[str, dict] = {
    "spec_defaults": {},
    "q_logprobs": {"q_form": "logprobs"},
    "q_ava": {"q_form": "ava"},
    "lambda_0.1": {"td_weight": 0.1, "reward_kl_weight": 0.1},
    "lambda_0.01": {"td_weight": 0.01, "reward_kl_weight": 0.01},
    "w_kl_10": {"reward_kl_weight": 10.0},
    "gamma_0.9": {"gamma": 0.9},
    "teacher_expected": {"td_target": "teacher_expected"},
    "q_logprobs_lambda_0.1": {"q_form": "logprobs", "td_weight": 0.1, "reward_kl_weight": 0.1},
    "q_ava_lambda_0.1": {"q_form": "ava", "td_weight": 0.1, "reward_kl_weight": 0.1},
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "q_ava_lambda_0.1"]  # the sweep as first run on BASE


def reference_of(base: str) -> str:
    """The GKD arm with `base`'s divergence and sequences (X-KD with the reward terms off)."""
    return base.replace("xkd_", "gkd_", 1)


def variant_name(variant: str, base: str) -> str:
    """A sweep.csv method name: the variant, tagged with its base arm unless that is BASE."""
    return variant if base == BASE or variant == reference_of(base) else f"{variant}@{base}"


def arm(variant: str, base: str = BASE) -> dict:
    """The `xkd:` block of the study's `base` arm with `variant`'s overrides (or base's GKD reference arm)."""
    if variant == reference_of(base):
        return study.METHODS[variant]
    return {**study.METHODS[base], **VARIANTS[variant]}


def relative_scores(rows: list[dict], tasks: list[str],
                    reference: str = REFERENCE) -> dict[str, tuple[float, dict[str, float]]]:
    """variant -> (mean over tasks of dev metric / the GKD `reference` arm's dev metric, {task: mean dev metric})."""
    means: dict[tuple[str, str], float] = {}
    for key in {(r["task"], r["method"]) for r in rows}:
        means[key] = statistics.fmean(float(r["metric"]) for r in rows if (r["task"], r["method"]) == key)
    out = {}
    for variant in {m for _, m in means} - {reference}:
        per_task = {t: means[(t, variant)] for t in tasks if (t, variant) in means}
        ratios = [per_task[t] / max(means.get((t, reference), 0.0), 1e-9) for t in per_task]
        if len(per_task) == len(tasks):
            out[variant] = (statistics.fmean(ratios), per_task)
    return out


def write_report(rows: list[dict], tasks: list[str], path: Path, command: str, base: str = BASE) -> str:
    """sweep.md: dev metric per variant and task (mean over seeds), the ratio to GKD and the choice."""
    gkd = reference_of(base)
    scores = relative_scores(rows, tasks, gkd)
    reference = {t: statistics.fmean(float(r["metric"]) for r in rows if (r["task"], r["method"]) == (t, gkd))
                 for t in tasks if any((r["task"], r["method"]) == (t, gkd) for r in rows)}
    sigma = {(r["task"], r["method"]): r.get("reward_sigma", "") for r in rows}
    lines = ["# X-KD variant sweep (dev split)", "", f"`{command}`. Base arm: {base}. "
             "Dev metric, mean over seeds; `vs GKD`: mean over tasks of the ratio to the GKD arm on dev; "
             "sigma: the reward head's mean sigma at the last logging step (first seed).", "",
             "| variant | " + " | ".join(f"{t} ({TASKS[t].metric_name})" for t in tasks) + " | vs GKD | sigma |",
             "|---" * (len(tasks) + 3) + "|",
             f"| {gkd} (reference) | " + " | ".join(f"{reference.get(t, float('nan')):.1f}" for t in tasks)
             + " | 1.00 | |"]
    for variant, (ratio, per_task) in sorted(scores.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {variant} | " + " | ".join(f"{per_task[t]:.1f}" for t in tasks)
                     + f" | {ratio:.2f} | " + " / ".join(str(sigma.get((t, variant), "")) for t in tasks) + " |")
    if scores:
        lines += ["", f"Chosen: **{max(scores, key=lambda v: scores[v][0])}**"]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    parser = study.follow_up_parser(__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--base", default=BASE, choices=[m for m in study.METHODS if m.startswith("xkd_")],
                        help="the X-KD arm the variants modify on dev (reports: sweep.md, or sweep_BASE.md)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per variant on the dev split")
    parser.add_argument("--final-seeds", type=int, default=3, help="seeds of the chosen variant on the test split")
    parser.add_argument("--final-arms", nargs="+", default=FINAL_ARMS, choices=[m for m in study.METHODS if "xkd" in m],
                        help="the study's X-KD arms rerun on the test split with the chosen variant")
    args = study.follow_up_args(parser)
    assets = {t: study.prepare_task(TASKS[t], args.work, args) for t in args.tasks}
    command = ("python -m benchmarks.quality.sweep " + " ".join(sys.argv[1:])).strip()

    sweep_csv = args.out / "sweep.csv"
    done = {(r["task"], r["method"], int(r["seed"])) for r in study.read_runs(sweep_csv)}
    dev_args = argparse.Namespace(**{**vars(args), "samples": 0})
    candidates = [reference_of(args.base), *args.variants]
    jobs = [partial(study.train_one, TASKS[t], assets[t], args.work, variant_name(v, args.base), s, 1.0, dev_args,
                    xkd=arm(v, args.base), split="dev")
            for t in args.tasks for v in candidates for s in range(args.seeds)
            if (t, variant_name(v, args.base), s) not in done]
    study.run_all(jobs, sweep_csv, args.jobs, "sweep (dev)")
    names = {variant_name(v, args.base): v for v in candidates}
    rows = [{**r, "method": names[r["method"]]} for r in study.read_runs(sweep_csv) if r["method"] in names]
    report = args.out / ("sweep.md" if args.base == BASE else f"sweep_{args.base}.md")
    print(write_report(rows, args.tasks, report, command, args.base))
    scores = relative_scores(rows, args.tasks, reference_of(args.base))
    chosen = max(scores, key=lambda v: scores[v][0])

    runs_csv = args.out / "runs.csv"
    done = {(r["task"], r["method"], int(r["seed"])) for r in study.read_runs(runs_csv)}
    jobs = [partial(study.train_one, TASKS[t], assets[t], args.work, f"{base}+{chosen}", s, 1.0, args,
                    xkd=arm(chosen, base))
            for s in range(args.final_seeds) for base in args.final_arms for t in args.tasks
            if (t, f"{base}+{chosen}", s) not in done]
    study.run_all(jobs, runs_csv, args.jobs, f"+{chosen} (test)")
    study.report(args, study.read_runs(runs_csv), f"python -m benchmarks.quality.study && {command}")


if __name__ == "__main__":
    main()
