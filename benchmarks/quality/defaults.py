"""Are the plugin's defaults safe with every divergence? Each divergence at the defaults against GKD with it.

    python -m benchmarks.quality.defaults [--seeds 3] [--tasks arithmetic_v2 translation summary]

For every divergence of the plugin, two arms train the study's student for the study's budget through the real
`axolotl train`: `gkd_<d>` (the reward terms off: plain distillation with d) and `default_<d>` (only
`divergence: d` set; every other `xkd:` key at the plugin's default, read from the schema, so the arm follows the
defaults when they change). `sequence` trains on the teacher's generations in both arms (SeqKD). Each student
is scored greedily on the dev prompts (the gate: the default arm's mean is at least 0.9x GKD's, on every task)
and on the test prompts (reported). Writes defaults.csv (resumable) and defaults.md under --out.
"""

from __future__ import annotations

import statistics
import sys
from functools import partial

from axolotl_xkd.args import XKDConfig
from axolotl_xkd.options import DIVERGENCES
from benchmarks.quality import study
from benchmarks.quality.tasks import TASKS

SHORT = {"forward_kl": "fkl", "reverse_kl": "rkl", "jsd": "jsd", "skew_forward_kl": "sfkl",
         "skew_reverse_kl": "srkl", "tvd": "tvd", "sequence": "seq"}
TASKS_GATED = ["arithmetic_v2", "translation", "summary"]  # the study's tasks, arithmetic_v2 for arithmetic
GATE = 0.9
FIELDS = [*study.FIELDS, "dev_metric"]


def arms() -> dict[str, dict]:
    """Arm name -> `xkd:` block: gkd_<d> and default_<d> for every divergence d."""
    table = {}
    for divergence in DIVERGENCES:
        block = {"divergence": divergence}
        if divergence == "sequence":
            block |= {"sequences": "teacher", "teacher": study.TEACHER_SEQUENCES}
        table[f"gkd_{SHORT[divergence]}"] = {**block, **study.REWARD_OFF}
        table[f"default_{SHORT[divergence]}"] = block
    return table


def report(runs: list[dict], tasks: list[str], command: str) -> str:
    """Markdown: per divergence and task, dev and test mean ± std of both arms, the dev ratio and the gate."""
    keys = ("td_target", "reward_detach_backbone", "q_form", "td_weight", "reward_kl_weight")
    defaults = {key: XKDConfig.model_fields[key].default for key in keys}
    lines = ["# Every divergence at the plugin's defaults against GKD with the same divergence", "",
             f"`{command}`. Defaults of the run: " + ", ".join(f"`{k}: {v}`" for k, v in defaults.items()) + ".",
             (f"Gate: the default arm's dev mean >= {GATE}x the GKD arm's, on every task. Mean ± std over seeds; "
              "greedy decoding."), "",
             "| divergence | task | GKD dev | default dev | dev ratio | gate | GKD test | default test | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    failed = []
    for divergence, short in SHORT.items():
        for task in tasks:
            cells = {}
            for arm in (f"gkd_{short}", f"default_{short}"):
                rows = [r for r in runs if r["task"] == task and r["method"] == arm]
                cells[arm] = {split: [float(r[key]) for r in rows] for split, key in
                              (("dev", "dev_metric"), ("test", "metric"))}
            gkd, ours = cells[f"gkd_{short}"], cells[f"default_{short}"]
            if not gkd["dev"] or not ours["dev"]:
                continue
            ratio = statistics.fmean(ours["dev"]) / statistics.fmean(gkd["dev"]) if statistics.fmean(
                gkd["dev"]) else float("inf")
            passed = ratio >= GATE
            if not passed:
                failed.append(f"{divergence} on {task}")
            lines.append(f"| {divergence} | {task} | {spread(gkd['dev'])} | {spread(ours['dev'])} | {ratio:.2f} | "
                         f"{'pass' if passed else 'FAIL'} | {spread(gkd['test'])} | {spread(ours['test'])} | "
                         f"{len(gkd['dev'])} / {len(ours['dev'])} |")
    lines += ["", "Gate: " + ("met on every divergence and task." if not failed else "missed on " + ", ".join(failed))]
    return "\n".join(lines) + "\n"


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def main() -> None:
    parser = study.follow_up_parser(__doc__.splitlines()[0])
    parser.set_defaults(tasks=TASKS_GATED, samples=0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=list(arms()), choices=list(arms()))
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
