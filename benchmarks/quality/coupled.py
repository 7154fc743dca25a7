"""Where does coupled X-KD help? The sweep of issue 27: the fading-force regime lambda < w_kl, on dev only.

    python -m benchmarks.quality.coupled [--seeds 3] [--carry 3] [--jobs 2] [--tasks ...]
        [--divergences fkl jsd tvd seq] [--td-targets observed soft] [--ratios 0.1 0.25 0.5] [--w-kl 0.1 1]

docs/defaults.md derives that with lambda = w_kl (every coupled setting measured before) the TD term pulls on the
student's Q with a constant force lambda * sign(r) that never fades, while with lambda < w_kl the head's sigma^2
stays near 1 - lambda / w_kl and the pull fades linearly with the residual r. This sweep trains, through the real
`axolotl train`, the spec's coupled form (TD_i from the student's Q: `td_target` observed or soft,
`reward_detach_backbone: false`) at lambda / w_kl in --ratios and w_kl in --w-kl, with each divergence in
--divergences (sequence-level: SeqKD on the teacher's generations), beside GKD with the same divergence (`gkd_<d>`:
the reward terms off), on the four study tasks, --seeds seeds, the study's budget, every student scored greedily
on the dev prompts only (nothing here reads the test split). Every run's whole log (loss, xkd/reward_sigma,
xkd/kd_force and xkd/td_force, the pulls of the divergence and the TD term on the logits) goes to history.jsonl,
to check the analysis. One setting (target, ratio, w_kl) is chosen for all divergences and tasks: the one whose
worst dev ratio to GKD with the same divergence, over every task and divergence, is highest.

The sweep runs in two stages, fixed before their results (a 624-run full factorial does not fit a session's two
cores): every setting at the first seed (the screen), then the other seeds for GKD and the --carry settings whose
seed-0 worst ratio (ties: mean ratio) is highest. The choice is made among the carried settings on their
--seeds-seed means; --carry 0 runs every setting at every seed.

Writes, under --out (default benchmarks/results/quality/coupled): sweep.csv (resumable), history.jsonl, sweep.md,
forces.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

from benchmarks.quality import study
from benchmarks.quality.defaults import TASKS_GATED
from benchmarks.quality.names import LONG, Setting, coupled_run, setting_of
from benchmarks.quality.stats import ratio
from benchmarks.quality.tasks import TASKS

SWEPT = ["fkl", "jsd", "tvd", "seq"]  # the divergences swept, by short name (names.LONG)
LOGGED = [*study.LOGGED, "kd_force", "td_force"]
SEEDS, CARRY = 3, 3  # the sweep's seeds, and the settings the seed-0 screen carries to the others
FIELDS = [*study.FIELDS[: -len(study.LOGGED)], *LOGGED]


def block(divergence: str, setting: Setting | None) -> dict:
    """The `xkd:` block of GKD with `divergence` (setting None) or of the coupled form at `setting`'s weights."""
    base = {"divergence": divergence}
    if divergence == "sequence":
        base |= {"sequences": "teacher", "teacher": study.TEACHER_SEQUENCES}
    return {**base, **(study.REWARD_OFF if setting is None else setting.xkd())}


def arms(divergences: list[str], targets: list[str], ratios: list[float], w_kls: list[float]) -> dict[str, dict]:
    """Run name -> `xkd:` block: gkd_<d> and coupled_<d>_<setting> for every divergence and setting."""
    table = {}
    for short in divergences:
        table[f"gkd_{short}"] = block(LONG[short], None)
        for target in targets:
            for lambda_ratio in ratios:
                for w_kl in w_kls:
                    setting = Setting(target, lambda_ratio, w_kl)
                    table[coupled_run(short, setting.name)] = block(LONG[short], setting)
    return table


def dev_means(runs: list[dict]) -> dict[tuple[str, str], list[float]]:
    """(task, run name) -> the dev metrics of its seeds."""
    out: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        out.setdefault((r["task"], r["method"]), []).append(float(r["metric"]))
    return out


def cell_ratios(runs: list[dict], tasks: list[str], divergences: list[str],
                seeds: int = 1) -> dict[str, dict[tuple[str, str], float]]:
    """setting -> {(task, divergence): mean dev of the coupled arm / mean dev of gkd_<d>}, for the settings whose
    every cell, and GKD's, has at least `seeds` seeds."""
    by = dev_means(runs)
    settings = {setting_of(m) for _, m in by} - {None}
    out = {}
    for setting in settings:
        pairs = {(t, d): (by.get((t, coupled_run(d, setting)), []), by.get((t, f"gkd_{d}"), []))
                 for t in tasks for d in divergences}
        if all(len(mine) >= seeds and len(ref) >= seeds for mine, ref in pairs.values()):
            out[setting] = {c: ratio(statistics.fmean(mine), statistics.fmean(ref)) for c, (mine, ref) in pairs.items()}
    return out


def ranked(ratios: dict[str, dict[tuple[str, str], float]]) -> list[str]:
    """Settings from the highest worst ratio over their cells down (ties: the highest mean ratio)."""
    return sorted(ratios, key=lambda s: (-min(ratios[s].values()), -statistics.fmean(ratios[s].values()), s))


def choose(ratios: dict[str, dict[tuple[str, str], float]]) -> str | None:
    """The setting with the highest worst ratio over its cells (ties: the highest mean ratio)."""
    return next(iter(ranked(ratios)), None)


def screen(runs: list[dict], tasks: list[str], divergences: list[str]) -> dict[str, dict[tuple[str, str], float]]:
    """The seed-0 ratios of every setting (the screen's table)."""
    return cell_ratios([r for r in runs if int(r["seed"]) == 0], tasks, divergences)


def carried(runs: list[dict], tasks: list[str], divergences: list[str], carry: int) -> list[str]:
    """The settings the screen carries to the other seeds: its best `carry` (every setting where carry is 0)."""
    order = ranked(screen(runs, tasks, divergences))
    return order[:carry] if carry else order


def final(runs: list[dict], tasks: list[str], divergences: list[str], seeds: int,
          carry: int) -> dict[str, dict[tuple[str, str], float]]:
    """The carried settings' ratios over `seeds` seeds, those complete; the choice is made among these."""
    ratios = cell_ratios(runs, tasks, divergences, seeds)
    return {s: ratios[s] for s in carried(runs, tasks, divergences, carry) if s in ratios}


def last_logged(history: Path) -> dict[tuple[str, str, int], dict]:
    """(task, run name, seed) -> the run's last logging step that measured the pulls (or its last one)."""
    out = {}
    if history.is_file():
        for line in history.read_text().splitlines():
            run = json.loads(line)
            measured = [e for e in run["log"] if "xkd/td_force" in e] or run["log"]
            out[(run["task"], run["method"], run["seed"])] = measured[-1]
    return out


def force_table(history: Path, settings: list[str], divergences: list[str]) -> list[str]:
    """Per setting and divergence: the head's sigma^2 at the end against 1 - lambda / w_kl (lambda < w_kl), and the
    TD term's pull on the logits relative to the divergence's, means over tasks and seeds."""
    ends = last_logged(history)
    lines = ["| setting | divergence | (mean sigma)^2 at the end | 1 - lambda / w_kl | td_force / kd_force | runs |",
             "|---|---|---|---|---|---|"]
    for setting in settings:
        r = Setting.parse(setting).ratio
        for d in divergences:
            logs = [e for (_, m, _), e in ends.items() if m == coupled_run(d, setting)]
            if not logs:
                continue
            sigma2 = statistics.fmean(e["xkd/reward_sigma"] ** 2 for e in logs)
            pulls = [e["xkd/td_force"] / e["xkd/kd_force"] for e in logs if e.get("xkd/kd_force")]
            pull = f"{statistics.fmean(pulls):.3f}" if pulls else ""
            lines.append(f"| {setting} | {d} | {sigma2:.3f} | {1 - r:.2f} | {pull} | {len(logs)} |")
    return lines


def trajectories(history: Path) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """setting -> logging step -> [(sigma^2, td_force / kd_force)] over its runs (every task, divergence, seed)."""
    out: dict[str, dict[int, list[tuple[float, float]]]] = {}
    if history.is_file():
        for line in history.read_text().splitlines():
            run = json.loads(line)
            if setting_of(run["method"]):
                steps = out.setdefault(setting_of(run["method"]), {})
                for e in run["log"]:
                    if e.get("xkd/kd_force"):
                        steps.setdefault(e["step"], []).append((e["xkd/reward_sigma"] ** 2,
                                                                e["xkd/td_force"] / e["xkd/kd_force"]))
    return out


def force_plot(history: Path, path: Path) -> None:
    """forces.png: the head's sigma^2 against the derived 1 - lambda / w_kl, and the TD term's pull on the logits
    relative to the divergence's, over training, one line per setting (means over its runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    curves = trajectories(history)
    settings = {name: Setting.parse(name) for name in curves}
    weights = sorted({s.weights for s in settings.values()})  # one colour per (ratio, w_kl); the target: the line
    for name, steps in sorted(curves.items()):
        xs = sorted(steps)
        setting = settings[name]
        style = {"color": f"C{weights.index(setting.weights)}",
                 "linestyle": "-" if setting.target == "observed" else ":", "marker": "o"}
        left.plot(xs, [statistics.fmean(v[0] for v in steps[x]) for x in xs], label=name, **style)
        right.plot(xs, [statistics.fmean(v[1] for v in steps[x]) for x in xs], label=name, **style)
    for r in sorted({s.ratio for s in settings.values()}):  # the plotted settings' ratios (--ratios)
        left.axhline(1 - r, color="grey", linewidth=0.7, linestyle="--")
    left.set(xlabel="step", ylabel="sigma^2 (dashed: 1 - lambda / w_kl)", title="the head's sigma^2")
    right.set(xlabel="step", ylabel="td_force / kd_force", yscale="log", title="TD pull relative to the divergence's")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ratio_table(ratios: dict[str, dict[tuple[str, str], float]], cells: list[tuple[str, str]]) -> list[str]:
    """One row per setting, best first: its worst and mean ratio and every cell's."""
    lines = ["| setting | worst | mean | " + " | ".join(f"{t} {d}" for t, d in cells) + " |",
             "|---" * (len(cells) + 3) + "|"]
    for setting in ranked(ratios):
        row = ratios[setting]
        lines.append(f"| {setting} | {min(row.values()):.2f} | {statistics.fmean(row.values()):.2f} | "
                     + " | ".join(f"{row[c]:.2f}" for c in cells) + " |")
    return lines


def report(runs: list[dict], history: Path, args: argparse.Namespace, command: str) -> str:
    """sweep.md: the screen (seed 0) and the carried settings' ratios to GKD over every cell, the choice, and the
    force table."""
    tasks, divergences = args.tasks, args.divergences
    ratios, screened = final(runs, tasks, divergences, args.seeds, args.carry), screen(runs, tasks, divergences)
    chosen = choose(ratios)
    cells = [(t, d) for d in divergences for t in tasks]
    seeds = dev_means(runs)
    lines = ["# Coupled X-KD sweep (dev split only)", "", f"`{command}`", "",
             "Dev metric ratio of the coupled form to GKD with the same divergence (means over seeds); a setting is "
             "target, lambda / w_kl (r) and w_kl (w). Chosen: the highest worst ratio over every task and "
             "divergence, among the settings the seed-0 screen carried to the other seeds.", "",
             f"## The carried settings, {args.seeds} seeds", "", *ratio_table(ratios, cells), "",
             "GKD dev means: " + ", ".join(
                 f"{t} {d} {statistics.fmean(seeds[(t, f'gkd_{d}')]):.1f} (n={len(seeds[(t, f'gkd_{d}')])})"
                 for t, d in cells if (t, f"gkd_{d}") in seeds), "",
             f"Chosen: **{chosen}**" if chosen else "No carried setting is complete yet.", "",
             "## The screen: every setting at seed 0", "", *ratio_table(screened, cells), "",
             "## The pulls on the student, at the last logging step", "",
             *force_table(history, ranked(screened), divergences)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = study.follow_up_parser(__doc__.splitlines()[0])
    parser.set_defaults(tasks=TASKS_GATED, samples=0, out=study.REPO / "benchmarks" / "results" / "quality" / "coupled")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--carry", type=int, default=CARRY, help="settings the seed-0 screen carries (0: all)")
    parser.add_argument("--divergences", nargs="+", default=SWEPT, choices=SWEPT)
    parser.add_argument("--td-targets", nargs="+", default=["observed", "soft"], choices=["observed", "soft"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.25, 0.5], help="lambda / w_kl")
    parser.add_argument("--w-kl", nargs="+", type=float, default=[0.1, 1.0])
    args = study.follow_up_args(parser)
    csv_path, history = args.out / "sweep.csv", args.out / "history.jsonl"
    table = arms(args.divergences, args.td_targets, args.ratios, args.w_kl)
    assets = {t: study.prepare_task(TASKS[t], args.work, args) for t in args.tasks}
    for t in args.tasks:
        if "seq" in args.divergences:
            study.teacher_store(TASKS[t], assets[t], "train.jsonl", args.work)

    def run(seeds: range, names: list[str], stage: str) -> None:
        done = {(r["task"], r["method"], int(r["seed"])) for r in study.read_runs(csv_path)}
        todo = [(t, m, s) for s in seeds for m in names for t in args.tasks if (t, m, s) not in done]
        jobs = [partial(study.train_one, TASKS[t], assets[t], args.work, m, s, 1.0, args, xkd=table[m], split="dev",
                        logged=LOGGED, history=history) for t, m, s in todo]
        study.run_all(jobs, csv_path, args.jobs, f"coupled sweep (dev, {stage})", fields=FIELDS)

    run(range(1), list(table), "screen")
    keep = carried(study.read_runs(csv_path), args.tasks, args.divergences, args.carry)
    run(range(1, args.seeds), [m for m in table if m.startswith("gkd_") or setting_of(m) in keep], "carried")
    command = ("python -m benchmarks.quality.coupled " + " ".join(sys.argv[1:])).strip()
    text = report(study.read_runs(csv_path), history, args, command)
    (args.out / "sweep.md").write_text(text)
    force_plot(history, args.out / "forces.png")
    print(text)


if __name__ == "__main__":
    main()
