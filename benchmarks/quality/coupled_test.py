"""Issue 27's test phase: the sweep's chosen coupled setting against GKD / SeqKD with the same divergence, SFT and
TRL's MiniLLM on the test split, with data-efficiency arms and the quality-diversity trade-off.

    python -m benchmarks.quality.coupled_test [--setting observed_r0.25_w1] [--seeds 5] [--fractions 1 0.3 0.1]
        [--temperatures 0.5 0.8 1.0 1.2] [--samples 4] [--jobs 2] [--tasks ...] [--divergences fkl jsd tvd seq]
        [--report-only]

The setting is the one `benchmarks.quality.coupled` chose on dev (the highest worst dev ratio to GKD over every
task and divergence, recomputed from its sweep.csv), unless --setting names one; the command refuses to start
before the sweep is complete. Per task, seed and data fraction it trains, through the real `axolotl train`: SFT,
GKD with each divergence (`gkd_<d>`; `gkd_seq` is SeqKD) and the coupled form at the setting
(`coupled_<d>_<setting>`), and TRL's MiniLLM with an SFT start at its dev-tuned rate (`trl_minillm_sft_lr0.001`,
minillm_sweep.md). Every student is scored greedily on test; full-data students also sample --samples responses
per prompt at each temperature (quality: the task metric over the samples; diversity: distinct-2, self-BLEU).

The decision rule was fixed before any test run (issue 27, item 4; docs/defaults.md): the setting becomes the
default only if on test its mean is at least 0.95x GKD's with the same divergence in every (task, divergence) cell
and it is ahead beyond seed spread (mean - std above GKD's mean + std, with the sample standard deviation: the
study's rule, benchmarks/quality/stats.py) in at least two tasks, with forward KL, the default divergence. Data efficiency: per method and task, the data fraction at which its mean
metric reaches GKD's (forward KL) full-data mean, linear between the measured fractions, with a bootstrap interval
over seeds. Writes, under --out (default benchmarks/results/quality/coupled): test.csv (resumable), test.md and
qd_<task>.png; --report-only rewrites test.md and the plots from test.csv and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from functools import partial
from pathlib import Path

from benchmarks.quality import study, trl_baselines
from benchmarks.quality.coupled import CARRY, SEEDS, SWEPT, block, carried, choose, final, screen
from benchmarks.quality.defaults import TASKS_GATED
from benchmarks.quality.names import LONG, Setting, coupled_run, setting_of
from benchmarks.quality.stats import ahead_beyond_spread, ratio, summary
from benchmarks.quality.tasks import TASKS

MINILLM = ("trl_minillm_sft", 0.001)  # the arm and the learning rate minillm_sweep.md chose on dev
QD_ARMS = ("sft", "gkd_fkl", "gkd_seq", "coupled_fkl", "coupled_seq")  # coupled_<d>: at the chosen setting
# The arms trained on data subsets too: the paper's data-efficiency claim is against GKD and SeqKD (MiniLLM, SFT
# beside them); the decision rule reads full data only, so JSD and TVD arms train on full data alone.
FRACTION_ARMS = (*QD_ARMS, MINILLM[0])
FIELDS = [*study.FIELDS[: -len(study.LOGGED)], "sampled"]


def chosen_setting(sweep_csv: Path, tasks: list[str], divergences: list[str], seeds: int = SEEDS,
                   carry: int = CARRY) -> str:
    """The sweep's choice among the settings its seed-0 screen carried; an error while the screen or a carried
    setting's seeds are incomplete."""
    runs = study.read_runs(sweep_csv)
    screened = screen(runs, tasks, divergences)
    settings = {setting_of(r["method"]) for r in runs} - {None}
    keep = carried(runs, tasks, divergences, carry)
    ratios = final(runs, tasks, divergences, seeds, carry)
    if not screened or set(screened) != settings or set(ratios) != set(keep):
        raise SystemExit(f"{sweep_csv}: the sweep is not complete ({len(screened)} of {len(settings)} settings "
                         f"screened at seed 0, {len(ratios)} of {len(keep)} carried settings at {seeds} seeds); "
                         "finish `python -m benchmarks.quality.coupled` or pass --setting")
    return choose(ratios)


def arm_blocks(setting: str, divergences: list[str]) -> dict[str, dict]:
    """Run name -> `xkd:` block of every arm trained here through Axolotl (MiniLLM runs in TRL)."""
    arms = {"sft": study.METHODS["sft"]}
    for short in divergences:
        arms[f"gkd_{short}"] = block(LONG[short], None)
        arms[coupled_run(short, setting)] = block(LONG[short], Setting.parse(setting))
    return arms


def base(method: str, setting: str) -> str:
    """A run name without its setting (coupled_fkl_<setting> -> coupled_fkl) or, for MiniLLM, its rate."""
    return method.removesuffix(f"_{setting}") if setting_of(method) == setting else method.split("_lr")[0]


def planned(tasks: list[str], names: list[str], seeds: int, fractions: list[float], setting: str,
            done: set[tuple[str, str, int, float]]) -> list[tuple[str, str, int, float]]:
    """(task, run name, seed, fraction) still to train, seed-major: every arm on full data, FRACTION_ARMS on the
    subsets too."""
    return [(t, m, s, f) for s in range(seeds) for f in fractions for t in tasks for m in names
            if (t, m, s, f) not in done and (f == 1.0 or base(m, setting) in FRACTION_ARMS)]


def metrics(runs: list[dict]) -> dict[tuple[str, str, float], list[float]]:
    """(task, method, data fraction) -> the seeds' test metrics."""
    out: dict[tuple[str, str, float], list[float]] = {}
    for r in runs:
        out.setdefault((r["task"], r["method"], float(r["data_fraction"])), []).append(float(r["metric"]))
    return out


def decision(by: dict, tasks: list[str], divergences: list[str], setting: str) -> tuple[bool, list[str]]:
    """The fixed rule: (adopt, the lines that show why)."""
    lines, floor_ok, ahead = [], True, []
    for t in tasks:
        for d in divergences:
            mine, ref = by.get((t, coupled_run(d, setting), 1.0)), by.get((t, f"gkd_{d}", 1.0))
            if not mine or not ref:
                return False, [f"incomplete: {t} {d}"]
            r = ratio(statistics.fmean(mine), statistics.fmean(ref))
            floor_ok &= r >= 0.95
            if d == "fkl" and ahead_beyond_spread(mine, ref):
                ahead.append(t)
            lines.append(f"| {t} | {d} | {summary(mine)} | {summary(ref)} | {r:.2f} |")
    adopt = floor_ok and len(ahead) >= 2
    verdict = (f"At least 0.95x GKD in every cell: {'yes' if floor_ok else 'no'}; ahead beyond seed spread with "
               f"forward KL on {len(ahead)} task(s) ({', '.join(ahead) or 'none'}; two needed). "
               f"**{'Adopt' if adopt else 'Do not adopt'}** the setting as the default.")
    return adopt, ["| task | divergence | coupled | GKD | ratio |", "|---|---|---|---|---|", *lines, "", verdict]


def fraction_to_reach(points: dict[float, float], goal: float) -> float | None:
    """The smallest data fraction where the mean metric reaches `goal`, linear between measured fractions
    (ascending); None when even the largest fraction does not."""
    xs = sorted(points)
    if points[xs[0]] >= goal:
        return xs[0]
    for lo, hi in zip(xs, xs[1:]):
        if points[hi] >= goal:
            return lo + (hi - lo) * (goal - points[lo]) / (points[hi] - points[lo])
    return None


def efficiency(by: dict, task: str, method: str, fractions: list[float], goal_runs: list[float],
               draws: int = 1000, seed: int = 0) -> str:
    """'f [lo, hi]': the fraction `method` needs to reach the mean of `goal_runs` (GKD's full-data seeds), with a
    95% bootstrap interval (seeds resampled in every arm and in the goal); '> 1' where it never does."""
    seeds = {f: by.get((task, method, f), []) for f in fractions}
    if not all(seeds.values()):
        return "incomplete"
    point = fraction_to_reach({f: statistics.fmean(v) for f, v in seeds.items()}, statistics.fmean(goal_runs))
    rng, found = random.Random(seed), []
    for _ in range(draws):
        means = {f: statistics.fmean(rng.choices(v, k=len(v))) for f, v in seeds.items()}
        reach = fraction_to_reach(means, statistics.fmean(rng.choices(goal_runs, k=len(goal_runs))))
        found.append(2.0 if reach is None else reach)  # beyond the data: above every measured fraction
    found.sort()
    lo, hi = found[int(0.025 * draws)], found[int(0.975 * draws) - 1]

    def text(v: float) -> str:
        return "> 1" if v > 1 else f"{v:.2f}"

    return f"{'> 1' if point is None else f'{point:.2f}'} [{text(lo)}, {text(hi)}]"


def qd_points(runs: list[dict], task: str, method: str) -> dict[str, list[tuple[float, float, float]]]:
    """temperature -> [(quality, distinct-2, self-BLEU) per seed] of a method's full-data runs on `task`."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for r in runs:
        if r["task"] == task and r["method"] == method and float(r["data_fraction"]) == 1.0 and r.get("sampled"):
            for temperature, s in json.loads(r["sampled"]).items():
                out.setdefault(temperature, []).append((s["metric"], s["distinct2"], s["self_bleu"]))
    return out


def dominates(a: dict, b: dict) -> bool:
    """Curve a dominates curve b: every mean point of b has a mean point of a at least as good in quality and in
    distinct-2, and a is not the same curve."""
    pa = [tuple(statistics.fmean(x[i] for x in v) for i in (0, 1)) for v in a.values()]
    pb = [tuple(statistics.fmean(x[i] for x in v) for i in (0, 1)) for v in b.values()]
    return bool(pa and pb) and pa != pb and all(any(q >= bq and d >= bd for q, d in pa) for bq, bd in pb)


def qd_section(runs: list[dict], tasks: list[str], methods: dict[str, str], out: Path) -> list[str]:
    """Per task: each curve's (label -> run name in `methods`) mean ± std at each temperature, which curve dominates
    which, and qd_<task>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for t in tasks:
        curves = {label: qd_points(runs, t, m) for label, m in methods.items()}
        fig, ax = plt.subplots(figsize=(5, 4))
        lines += [f"### {t}", "", "| method | temperature | quality | distinct-2 | self-BLEU |",
                  "|---|---|---|---|---|"]
        for label, curve in curves.items():
            xs, ys, xe, ye = [], [], [], []
            for temperature in sorted(curve, key=float):
                pts = curve[temperature]
                (q, qs, _), (d, ds, _), (b, _, _) = (summary([p[i] for p in pts]) for i in range(3))
                lines.append(f"| {label} | {temperature} | {q:.1f} ± {qs:.1f} | {d:.3f} ± {ds:.3f} | {b:.1f} |")
                xs.append(d), ys.append(q), xe.append(ds), ye.append(qs)
            if xs:
                ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=2, label=label)
        wins = [f"{a} dominates {b}" for a in curves for b in curves if a != b and dominates(curves[a], curves[b])]
        lines += ["", "Dominance (means): " + ("; ".join(wins) or "no curve dominates another") + ".", ""]
        ax.set_xlabel("distinct-2 (diversity)")
        ax.set_ylabel(f"{TASKS[t].metric_name} of samples")
        temperatures = sorted({temperature for curve in curves.values() for temperature in curve}, key=float)
        ax.set_title(f"{t}: temperatures {', '.join(temperatures)}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"qd_{t}.png", dpi=120)
        plt.close(fig)
    return lines


def report(runs: list[dict], args: argparse.Namespace, setting: str, command: str) -> str:
    """test.md: the decision rule applied, every arm's test metric, data efficiency, the quality-diversity curves."""
    by = metrics(runs)
    minillm = trl_baselines.method_name(*MINILLM)
    methods = ["sft", minillm, *(name for d in args.divergences for name in (f"gkd_{d}", coupled_run(d, setting)))]
    _, rule = decision(by, args.tasks, args.divergences, setting)
    lines = ["# Coupled X-KD on test (issue 27)", "", f"`{command}`", "", f"Setting chosen on dev: **{setting}**.",
             "", "## The decision rule (fixed before the test runs)", "", *rule, "", "## Test metric, mean ± std",
             "", "| method | fraction | " + " | ".join(args.tasks) + " |", "|---" * (len(args.tasks) + 2) + "|"]
    for m in methods:
        for f in [f for f in sorted(args.fractions, reverse=True) if f == 1.0 or base(m, setting) in FRACTION_ARMS]:
            cells = [by.get((t, m, f)) for t in args.tasks]
            lines.append(f"| {m} | {f:g} | " + " | ".join(f"{summary(c)} (n={len(c)})" if c else "" for c in cells)
                         + " |")
    lines += ["", "## Data efficiency", "", "The data fraction each method needs to reach GKD's (forward KL) "
              "full-data mean, linear between the measured fractions, [95% bootstrap interval over seeds].", "",
              "| method | " + " | ".join(args.tasks) + " |", "|---" * (len(args.tasks) + 1) + "|"]
    for m in (m for m in methods if base(m, setting) in FRACTION_ARMS):
        lines.append(f"| {m} | " + " | ".join(
            efficiency(by, t, m, args.fractions, by.get((t, "gkd_fkl", 1.0), [])) if by.get((t, "gkd_fkl", 1.0))
            else "incomplete" for t in args.tasks) + " |")
    qd = {label: coupled_run(label.removeprefix("coupled_"), setting) if label.startswith("coupled_") else label
          for label in QD_ARMS}
    lines += ["", "## Quality and diversity", "", *qd_section(runs, args.tasks, qd, args.out)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = study.follow_up_parser(__doc__.splitlines()[0])
    parser.set_defaults(tasks=TASKS_GATED, out=study.REPO / "benchmarks" / "results" / "quality" / "coupled")
    parser.add_argument("--setting", help="a sweep setting, e.g. observed_r0.25_w1 (default: the sweep's choice)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--divergences", nargs="+", default=SWEPT, choices=SWEPT)
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.3, 0.1])
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.5, 0.8, 1.0, 1.2])
    parser.add_argument("--report-only", action="store_true", help="rewrite test.md and the plots from test.csv")
    args = study.follow_up_args(parser)
    for f in args.fractions:
        if f != 1.0 and f not in study.FRACTIONS:
            parser.error(f"--fractions: {f} is not 1 or one of the prepared subsets {study.FRACTIONS}")
    setting = args.setting or chosen_setting(args.out / "sweep.csv", args.tasks, args.divergences)
    csv_path = args.out / "test.csv"
    if not args.report_only:
        train(args, setting, csv_path)
    command = ("python -m benchmarks.quality.coupled_test " + " ".join(sys.argv[1:])).strip()
    if args.report_only and (trained_by := recorded_command(args.out / "test.md")):
        command = f"{trained_by}`; this report rebuilt from test.csv by `{command}"
    text = report(study.read_runs(csv_path), args, setting, command)
    (args.out / "test.md").write_text(text)
    print(text)


def recorded_command(path: Path) -> str | None:
    """The training command a test.md names (its first line in backticks, before any rebuild), or None."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("`")] if path.is_file() else []
    return lines[0].strip("`").split("`;")[0] if lines else None


def train(args: argparse.Namespace, setting: str, csv_path: Path) -> None:
    """Train every arm's runs that test.csv lacks, appending each to it."""
    done = {(r["task"], r["method"], int(r["seed"]), float(r["data_fraction"])) for r in study.read_runs(csv_path)}
    arms = arm_blocks(setting, args.divergences)
    assets = {t: study.prepare_task(TASKS[t], args.work, args) for t in args.tasks}
    minillm = trl_baselines.method_name(*MINILLM)
    todo = planned(args.tasks, [*arms, minillm], args.seeds, args.fractions, setting, done)
    for t in args.tasks:
        for f in args.fractions:
            if "seq" in args.divergences:
                study.teacher_store(TASKS[t], assets[t], study.data_file(f), args.work)
    sampling = tuple(args.temperatures)
    jobs = []
    for t, m, s, f in todo:
        temperatures = sampling if f == 1.0 and base(m, setting) in QD_ARMS else ()
        if m == minillm:
            jobs.append(partial(trl_baselines.run_subprocess, t, MINILLM[0], s, args, lr=MINILLM[1], fraction=f))
        else:
            jobs.append(partial(study.train_one, TASKS[t], assets[t], args.work, m, s, f, args, xkd=arms[m],
                                logged=[], temperatures=temperatures))
    study.run_all(jobs, csv_path, args.jobs, "coupled test", fields=FIELDS)


if __name__ == "__main__":
    main()
