"""Are the plugin's defaults safe with every divergence? Each divergence at the defaults against GKD with it.

    python -m benchmarks.quality.defaults [--seeds 3] [--tasks arithmetic arithmetic_v2 translation summary]

For every divergence of the plugin, two arms train the study's student for the study's budget through the real
`axolotl train`: `gkd_<d>` (the reward terms off: plain distillation with d) and `default_<d>` (only
`divergence: d` set; every other `xkd:` key at the plugin's default, read from the schema, so the arm follows the
defaults when they change); `coupled_<d>`, run by name, is the previous defaults (the TD term on the student's Q,
the head's gradient in its body), for contrast. `sequence` trains on the teacher's generations in both arms (SeqKD). Each student
is scored greedily on the dev prompts (the gate: the default arm's mean is at least 0.9x GKD's, on every task)
and on the test prompts (reported). Writes defaults.csv (resumable) and defaults.md under --out.
"""

from __future__ import annotations

import statistics
import sys
from functools import partial

from axolotl_xkd.args import XKDConfig
from axolotl_xkd.options import COUPLED_FORM, DIVERGENCES
from benchmarks.quality import study
from benchmarks.quality.names import SHORT  # cross_tokenizer.py reads it from here
from benchmarks.quality.stats import ratio as mean_ratio
from benchmarks.quality.stats import summary
from benchmarks.quality.tasks import TASKS

TASKS_GATED = ["arithmetic", "arithmetic_v2", "translation", "summary"]  # the study's tasks and arithmetic_v2
GATE = 0.9
FIELDS = [*study.FIELDS, "dev_metric"]
# The defaults until 2026-11-30 (the same weights and q_form): TD_i on the student's Q, the head's gradient in its body.
COUPLED = COUPLED_FORM


def arms() -> dict[str, dict]:
    """Arm name -> `xkd:` block: gkd_<d>, default_<d> and coupled_<d> (the previous defaults) for every divergence d."""
    table = {}
    for divergence in DIVERGENCES:
        block = {"divergence": divergence}
        if divergence == "sequence":
            block |= {"sequences": "teacher", "teacher": study.TEACHER_SEQUENCES}
        table[f"gkd_{SHORT[divergence]}"] = {**block, **study.REWARD_OFF}
        table[f"default_{SHORT[divergence]}"] = block
        table[f"coupled_{SHORT[divergence]}"] = {**block, **COUPLED}
    return table


def report(runs: list[dict], tasks: list[str], command: str) -> str:
    """Markdown: per divergence and task, dev and test mean ± std of both arms, the dev ratio and the gate."""
    keys = ("td_target", "reward_detach_backbone", "q_form", "td_weight", "reward_kl_weight")
    defaults = {key: XKDConfig.model_fields[key].default for key in keys}
    lines = ["# Every divergence at the plugin's defaults against GKD with the same divergence", "",
             f"`{command}`. Defaults of the run: " + ", ".join(f"`{k}: {v}`" for k, v in defaults.items()) + ".",
             (f"Gate: the default arm's dev mean >= {GATE}x the GKD arm's, on every task (both 0: ratio 1). Mean ± "
              "std over seeds; greedy decoding. `same student`: every seed's test and dev metric and final "
              "`xkd/distill` are equal in the two arms. Last column: the previous defaults (`coupled_<d>`: "
              "td_target observed, head not detached, the same weights): dev mean ± std, its ratio to GKD's, and test."), "",
             ("| divergence | task | GKD dev | default dev | dev ratio | gate | GKD test | default test | same student "
              "| seeds | previous default dev (ratio) | previous default test |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failed, rows = [], 0
    for divergence, short in SHORT.items():
        for task in tasks:
            arm_runs = {arm: {int(r["seed"]): r for r in runs if r["task"] == task and r["method"] == arm}
                        for arm in (f"gkd_{short}", f"default_{short}", f"coupled_{short}")}
            gkd, ours = arm_runs[f"gkd_{short}"], arm_runs[f"default_{short}"]
            if not gkd or not ours:
                continue
            rows += 1
            values = {name: {key: [float(r[key]) for r in arm.values()] for key in ("dev_metric", "metric")}
                      for name, arm in (("gkd", gkd), ("ours", ours))}
            base, mine = (statistics.fmean(values[name]["dev_metric"]) for name in ("gkd", "ours"))
            ratio = mean_ratio(mine, base)
            if ratio < GATE:
                failed.append(f"{divergence} on {task}")
            same = sorted(gkd) == sorted(ours) and all(
                gkd[seed][key] == ours[seed][key] for seed in gkd for key in ("metric", "dev_metric", "distill"))
            coupled = [float(r["dev_metric"]) for r in arm_runs[f"coupled_{short}"].values()]
            coupled_test = [float(r["metric"]) for r in arm_runs[f"coupled_{short}"].values()]
            before = "" if not coupled else (f"{spread(coupled)} ({statistics.fmean(coupled) / base:.2f})" if base
                                             else spread(coupled)) + f" | {spread(coupled_test)}"
            lines.append(f"| {divergence} | {task} | {spread(values['gkd']['dev_metric'])} | "
                         f"{spread(values['ours']['dev_metric'])} | {ratio:.2f} | {'FAIL' if ratio < GATE else 'pass'} | "
                         f"{spread(values['gkd']['metric'])} | {spread(values['ours']['metric'])} | "
                         f"{'yes' if same else 'no'} | {len(gkd)} / {len(ours)} | {before or ' | '} |")
    verdict = ("no runs yet." if not rows else "met on every divergence and task." if not failed
               else "missed on " + ", ".join(failed) + ".")
    lines += ["", f"Gate: {verdict}"]
    return "\n".join(lines) + "\n"


def spread(values: list[float]) -> str:
    return str(summary(values))


def main() -> None:
    parser = study.follow_up_parser(__doc__.splitlines()[0])
    parser.set_defaults(tasks=TASKS_GATED, samples=0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=[a for a in arms() if not a.startswith("coupled_")],
                        choices=list(arms()), help="default: the gkd_ and default_ arms")
    args = study.follow_up_args(parser)
    csv_path = args.out / "defaults.csv"
    table = arms()
    done = {(r["task"], r["method"], int(r["seed"])) for r in study.read_runs(csv_path)}
    assets = {t: study.prepare_task(TASKS[t], args.work, args) for t in args.tasks}
    todo = [(t, m, s) for s in range(args.seeds) for t in args.tasks for m in args.arms if (t, m, s) not in done]
    for t in args.tasks:  # the sequence arms share the teacher's generations: build them before the parallel runs
        if any(table[m].get("teacher") == study.TEACHER_SEQUENCES for _, m, _ in todo):
            study.teacher_store(TASKS[t], assets[t], "train.jsonl", args.work)
    jobs = [partial(study.train_one, TASKS[t], assets[t], args.work, m, s, 1.0, args, xkd=table[m], dev_too=True)
            for t, m, s in todo]
    study.run_all(jobs, csv_path, args.jobs, "defaults", fields=FIELDS)
    command = ("python -m benchmarks.quality.defaults " + " ".join(sys.argv[1:])).strip()
    text = report(study.read_runs(csv_path), args.tasks, command)
    (args.out / "defaults.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
