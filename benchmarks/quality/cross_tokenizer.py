"""Cross-tokenizer quality study: does distillation from a teacher of another tokenizer work, against GKD with a
teacher of the student's tokenizer, SFT, and TRL's GOLD? One command, on the CPU, resumable.

    python -m benchmarks.quality.cross_tokenizer [--seeds 3] [--jobs 2] [--tasks translation summary arithmetic_v2]

Per task the student is the study's (its character tokenizer, the untrained student of study.prepare_task). Two
teachers of the study's size (hidden 128, 2 layers, the same steps on the same training split): the study's own, of
the student's tokenizer, and one of another tokenizer, a byte-level BPE trained in code on the task's training text
(cached under --work like the study's teacher). Arms, each for the study's budget (150 steps of 32 rows) through the
real `axolotl train` and the plugin, except GOLD: `sft`; `gkd_same_fkl` (the same-tokenizer teacher, forward KL,
reward terms off); `cross_<d>` (the other teacher, `cross_tokenizer: true`, divergence d, reward terms off);
`cross_default` (the other teacher at the plugin's defaults: the reward head learns beside the student, which trains
as cross_fkl's); `trl_gold_off` (TRL's GOLDTrainer, benchmarks/quality/gold.py). Every student is scored greedily on
the dev prompts and the test prompts; the cross-tokenizer divergence is chosen by its dev mean over the tasks and
reported on test. Writes runs.csv (appended per run) and table.md under --out.

BPE students (issue 32), a protocol fixed before its runs:

    python -m benchmarks.quality.cross_tokenizer --bpe-students --seeds 3 --jobs 2 --threads 1

The same question where the student's tokenizer is a BPE too, across the two space conventions: a sentencepiece-style
teacher (Metaspace `▁`, dummy prefix, BOS, byte fallback) distilled into a byte-level BPE student (`Ġ`, no BOS), and
a byte-level teacher into a sentencepiece-style student. Task: arithmetic_v2 only (the quickest task, and the one
where the teacher clearly beats SFT: 98% against SFT's 43-50% for the character student). Both tokenizers are
trained in code on the task's training text (tiny.build_bpe_tokenizer): byte-level with up to 64 merges over the 256
bytes and 4 specials; sentencepiece-style with 64 merges over the text's characters, `▁` and the 4 specials, plus
its 256 byte-fallback tokens. Over each: one teacher of the study's size and training (hidden 128, 2 layers, 1500
steps on the training split, seed 0; cached under --work) and one untrained student, the study's arithmetic_v2
student body (hidden 64, 2 layers, seed 1). Per direction, the student of tokenizer X, 150 steps of 32 through
`axolotl train`, seeds 0, 1, 2, arms: `sft`; `gkd_same_fkl` (the teacher of X, forward KL, reward terms off);
`cross_fkl` (the teacher of the other convention, `cross_tokenizer: true`, forward KL, reward terms off). Every
student is scored greedily on the dev and the test prompts (exact match). Targets, per direction: cross_fkl's dev
mean >= 0.95x gkd_same_fkl's dev mean, and cross_fkl's test mean >= sft's test mean (the character study's two
targets; nothing is chosen on dev here, so the table gives both ratios on both splits). Writes bpe_runs.csv
(appended per run, resumable: a rerun trains only what it lacks) and bpe_students.md under --out; --report-only
rewrites bpe_students.md from bpe_runs.csv without training.

The cross_fkl arm first ran on the code before commit 12466a1, which reads the teacher on the student's text as one
piece: both directions missed both targets, the first response tokens trained towards a space and wrong digits (the
sentencepiece-style side writes a dummy space before the response that the byte-level side does not). 12466a1 makes
the teacher re-tokenize the prompt and the response apart; cross_fkl was rerun on it, and the report lists the first
runs (bpe_runs_before_12466a1.csv) beside the new ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from importlib.metadata import version
from pathlib import Path

from axolotl_xkd.options import TOKEN_DIVERGENCES
from axolotl_xkd.tiny import SPECIALS
from benchmarks.quality import gold, study
from benchmarks.quality.defaults import SHORT
from benchmarks.quality.tasks import TASKS, Task

DEFAULT_TASKS = ["translation", "summary", "arithmetic_v2"]
# The other tokenizer: byte-level BPE, whose base vocabulary is the 256 bytes and the 4 specials; up to 64 merges on
# top give whole words and two-digit numbers (324 tokens, about 4x the character tokenizer's 79; arithmetic_v2's text
# has 27 pairs to merge, so its teacher has 287).
BPE_STYLE = "byte_level"
BPE_VOCAB = 256 + 4 + 64
OTHER_TEACHER = "teacher_byte_level"
DIVERGENCES = {short: name for name, short in SHORT.items() if name in TOKEN_DIVERGENCES}  # fkl -> forward_kl, ...
DEFAULT_DIVERGENCES = ["fkl", "rkl", "jsd"]
REFERENCE, SFT, DEFAULT_ARM = "gkd_same_fkl", "sft", "cross_default"
FIELDS = [*study.FIELDS, "dev_metric"]
DEV_RATIO = 0.95  # target: the chosen cross-tokenizer arm's dev mean >= 0.95x same-tokenizer GKD's, per task


def arms(other_teacher: Path, divergences: list[str]) -> dict[str, dict]:
    """Arm name -> `xkd:` block of study.train_one, for a task whose teacher of another tokenizer is `other_teacher`."""
    cross = {"source": "model", "path": str(other_teacher), "cross_tokenizer": True}
    table = {SFT: study.METHODS["sft"], REFERENCE: {"divergence": "forward_kl", **study.REWARD_OFF}}
    for short in divergences:
        table[f"cross_{short}"] = {"divergence": DIVERGENCES[short], **study.REWARD_OFF, "teacher": cross}
    table[DEFAULT_ARM] = {"teacher": cross}
    return table


# ---- the teacher of another tokenizer -----------------------------------------------------------------------


def response_alignment(aligner, student, row: dict, where: str) -> tuple[list[int], list[int], int]:
    """One row tokenized as Axolotl tokenizes it (prompt with BOS, response, EOS) and aligned: (the teacher's ids,
    the teacher positions paired with the row's response positions where both tokenizers cut the text, the number of
    response positions). Response positions are those predicting a response token or the EOS."""
    prompt = student(row["prompt"])["input_ids"]
    ids = prompt + student(row["response"], add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    segment = aligner.segment(ids, where)
    first, last = len(prompt) - 1, len(ids) - 2
    both = set(segment.aligned)
    paired = [j for i, j in zip(segment.student_positions, segment.teacher_positions)
              if first <= i <= last and i in both]
    return segment.teacher_ids, paired, last - first + 1


def response_coverage(aligner, student, rows: list[dict]) -> float:
    """Share of the rows' response positions where both tokenizers cut the text (the rest read the teacher inside one
    of its tokens)."""
    counts = [response_alignment(aligner, student, row, f"row {n}")[1:] for n, row in enumerate(rows)]
    return sum(len(paired) for paired, _ in counts) / max(sum(total for _, total in counts), 1)


def unmapped_mass(model, aligner, student, rows: list[dict]) -> float:
    """The teacher's mean probability, at the rows' aligned response positions, on its tokens without a student
    twin (its multi-character tokens): the mass an exact vocabulary map would leave to the tail, which the prefix
    projection gives to the student token each of them starts with (docs/cross_tokenizer.md)."""
    import torch

    unmapped = aligner.vocab.student_ids < 0
    masses = []
    with torch.no_grad():
        for n, row in enumerate(rows):
            teacher_ids, paired, _ = response_alignment(aligner, student, row, f"row {n}")
            logits = model(input_ids=torch.tensor([teacher_ids])).logits[0, paired, : unmapped.numel()]
            masses += logits.softmax(-1)[:, unmapped].sum(-1).tolist()
    return statistics.fmean(masses)


def prepare_other_teacher(task: Task, assets: dict[str, Path], work: Path, args: argparse.Namespace) -> dict:
    """Train (once, cached in `work`) the teacher of another tokenizer for `task`: the study's teacher size, steps and
    training rows, over a byte-level BPE trained on the training text; returns its folder and how it tokenizes."""
    import torch
    from transformers import AutoTokenizer

    from axolotl_xkd.cross_tokenizer import Aligner
    from axolotl_xkd.tiny import build_bpe_tokenizer, build_model, train_teacher

    folder = work / task.name / OTHER_TEACHER
    stamp = work / task.name / f"{OTHER_TEACHER}.json"
    settings = {**study.task_settings(task.name, args), "style": BPE_STYLE, "vocab_size": BPE_VOCAB}
    if stamp.is_file() and (info := json.loads(stamp.read_text())).get("settings") == settings:
        return {**info, "path": folder}
    rows = [json.loads(line) for line in (assets["data"] / "train.jsonl").read_text().splitlines()]
    tokenizer = build_bpe_tokenizer([r["prompt"] + r["response"] for r in rows], style=BPE_STYLE,
                                    vocab_size=BPE_VOCAB)
    torch.manual_seed(0)
    teacher = build_model(tokenizer, hidden=settings["teacher_hidden"], layers=2, seed=0)
    started = time.perf_counter()
    loss = train_teacher(teacher, tokenizer, rows, steps=settings["teacher_steps"], seed=0)
    seconds = time.perf_counter() - started
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    evaluation = [json.loads(line) for line in (assets["data"] / "eval.jsonl").read_text().splitlines()]
    student = AutoTokenizer.from_pretrained(assets["student"])
    sample = rows[:500]
    aligner = Aligner(student, tokenizer, OTHER_TEACHER)
    info = {
        "settings": settings, "teacher_loss": loss, "teacher_seconds": round(seconds, 1),
        "teacher_metric": study.evaluate(folder, task, evaluation, samples=0)["metric"],
        "parameters": sum(p.numel() for p in teacher.parameters()),
        "student_vocab": len(student), "teacher_vocab": len(tokenizer),
        **pair_figures(aligner, student, tokenizer, teacher, sample),
    }
    stamp.write_text(json.dumps(info))
    print(f"{task.name}: teacher of another tokenizer ({len(tokenizer)} tokens) trained in {seconds:.0f} s, "
          f"held-out {task.metric_name} {info['teacher_metric']:.1f}; coverage {info['coverage']:.1%}, unmapped mass "
          f"{info['unmapped_mass']:.1%}", flush=True)
    return {**info, "path": folder}


# ---- GOLD ---------------------------------------------------------------------------------------------------


def run_gold(task: str, seed: int, teacher: Path, args: argparse.Namespace) -> dict:
    """gold.train_gold in its own process (accelerate's state is per process); returns its CSV row."""
    command = [sys.executable, "-m", "benchmarks.quality.gold", task, str(seed), "--teacher", str(teacher),
               "--steps", str(args.steps), "--samples", str(args.samples), "--threads", str(args.threads),
               "--work", str(args.work)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=study.REPO,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------------------------


def stats(runs: list[dict], task: str, arm: str, key: str) -> tuple[float, float, int] | None:
    """(mean, std, n) of `key` over the seeds of `arm` on `task`; None without runs."""
    values = [float(r[key]) for r in runs if r["task"] == task and r["method"] == arm and r[key] != ""]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def seed_counts(runs: list[dict], task: str) -> str:
    """How many seeds each arm has on `task`: one number when all arms have the same, else the range."""
    counts = {}
    for r in runs:
        if r["task"] == task:
            counts[r["method"]] = counts.get(r["method"], 0) + 1
    low, high = min(counts.values(), default=0), max(counts.values(), default=0)
    return str(low) if low == high else f"{low}-{high}"


def cell(value: tuple[float, float, int] | None) -> str:
    return "" if value is None else f"{value[0]:.1f} ± {value[1]:.1f} (n={value[2]})"


def ratio(runs: list[dict], task: str, arm: str, other: str, key: str) -> str:
    """`arm`'s mean of `key` over `other`'s on `task`, two decimals; empty without runs of both, '-' over a 0 mean."""
    ours, theirs = stats(runs, task, arm, key), stats(runs, task, other, key)
    if not ours or not theirs:
        return ""
    return f"{ours[0] / theirs[0]:.2f}" if theirs[0] else "-"


def choose(runs: list[dict], tasks: list[str], candidates: list[str]) -> tuple[str | None, dict[str, float]]:
    """The candidate arm with the highest dev mean over `tasks` (each task's mean over seeds, then the mean over the
    tasks); only candidates with runs on every task compete. Returns (chosen or None, candidate -> that mean)."""
    means = {}
    for arm in candidates:
        per_task = [stats(runs, t, arm, "dev_metric") for t in tasks]
        if all(per_task):
            means[arm] = statistics.fmean(s[0] for s in per_task)
    return (max(means, key=means.get) if means else None), means


def verdicts(runs: list[dict], tasks: list[str], chosen: str) -> list[str]:
    """The three targets for the chosen arm, per task, with the numbers: dev >= DEV_RATIO x same-tokenizer GKD's dev;
    test mean >= SFT's test mean; not behind GOLD on test (behind: its mean + std below GOLD's mean - std)."""
    lines = []
    checks = {"dev": [], "sft": [], "gold": []}
    for t in tasks:
        ours_dev, ours = stats(runs, t, chosen, "dev_metric"), stats(runs, t, chosen, "metric")
        ref, sft, trl = stats(runs, t, REFERENCE, "dev_metric"), stats(runs, t, SFT, "metric"), \
            stats(runs, t, gold.ARM, "metric")
        if ours_dev and ref:
            ratio = ours_dev[0] / ref[0] if ref[0] else (1.0 if ours_dev[0] == 0 else float("inf"))
            checks["dev"].append((t, ratio >= DEV_RATIO, f"{t} {ours_dev[0]:.1f} / {ref[0]:.1f} = {ratio:.2f}"))
        if ours and sft:
            checks["sft"].append((t, ours[0] >= sft[0], f"{t} {ours[0]:.1f} vs {sft[0]:.1f}"))
        if ours and trl:
            place = ("ahead" if ours[0] - ours[1] > trl[0] + trl[1] else
                     "behind" if ours[0] + ours[1] < trl[0] - trl[1] else
                     "level, both 0" if ours[0] == trl[0] == 0 else "level")
            checks["gold"].append((t, place != "behind", f"{t} {ours[0]:.1f} ± {ours[1]:.1f} vs {trl[0]:.1f} ± "
                                                         f"{trl[1]:.1f} ({place})"))
    names = {"dev": f"dev mean >= {DEV_RATIO}x same-tokenizer GKD's ({REFERENCE})",
             "sft": "test mean >= SFT's, every task", "gold": f"level with GOLD ({gold.ARM}) on test or ahead"}
    for key, found in checks.items():
        if not found:
            lines.append(f"- {names[key]}: no runs yet.")
            continue
        missed = [t for t, ok, _ in found if not ok]
        verdict = ("met" if not missed else "missed on " + ", ".join(missed)) + (
            "" if len(found) == len(tasks) else f" ({len(found)} of {len(tasks)} tasks have runs)")
        lines.append(f"- {names[key]}: **{verdict}**. " + "; ".join(text for _, _, text in found) + ".")
    return lines


def same_student(runs: list[dict], task: str) -> str:
    """Whether cross_default trained cross_fkl's student: every common seed's test and dev metric and final
    xkd/distill equal ('yes' / 'no', with the seeds compared)."""
    by_arm = {arm: {r["seed"]: r for r in runs if r["task"] == task and r["method"] == arm}
              for arm in ("cross_fkl", DEFAULT_ARM)}
    seeds = sorted(set(by_arm["cross_fkl"]) & set(by_arm[DEFAULT_ARM]))
    if not seeds:
        return "no common seeds yet"
    same = all(by_arm["cross_fkl"][s][k] == by_arm[DEFAULT_ARM][s][k] for s in seeds
               for k in ("metric", "dev_metric", "distill"))
    return f"{'yes' if same else 'no'} ({len(seeds)} seeds)"


def report(runs: list[dict], tasks: list[str], teachers: dict[str, dict], candidates: list[str], command: str) -> str:
    """table.md: the setup, mean ± std per arm and task on dev and test, the chosen divergence, the targets and the
    train seconds."""
    names = list(dict.fromkeys([SFT, REFERENCE, *candidates, DEFAULT_ARM, gold.ARM, *(r["method"] for r in runs)]))
    names = [a for a in names if any(r["method"] == a and r["task"] in tasks for r in runs)]
    chosen, dev_means = choose(runs, tasks, candidates)
    lines = ["# Cross-tokenizer distillation: quality (generated tasks, CPU)", "",
             f"`{command}`. Mean ± std over seeds (n = seeds), greedy decoding, {len(runs)} runs; seeds finished per "
             "task: " + "; ".join(f"{t} {seed_counts(runs, t)}" for t in tasks) + ".", "",
             "Teachers (hidden 128, 2 layers, the same steps and training rows; held-out test metric) and how the "
             f"other tokenizer cuts a response: a {BPE_STYLE} BPE trained on the task's training text, 256 bytes, 4 "
             f"specials and up to {BPE_VOCAB - 260} merges (fewer where the text has fewer pairs to merge). Aligned: "
             "response positions whose prefix ends where a teacher token ends (the rest read the teacher inside one "
             "of its tokens); the last column is the teacher's probability there on its tokens without a student "
             "twin (multi-character tokens), which the prefix projection gives to the student token each starts "
             "with (an exact vocabulary map would leave it to the tail).", "",
             "| task | same-tokenizer teacher | other-tokenizer teacher | vocab student / teacher (mapped) | "
             "response tokens student / teacher | response positions aligned | teacher mass there without a student "
             "twin |",
             "|---|---|---|---|---|---|---|"]
    for t in tasks:
        info = teachers[t]
        lines.append(f"| {t} ({TASKS[t].metric_name}) | {info['same_metric']:.1f} | {info['teacher_metric']:.1f} | "
                     f"{info['student_vocab']} / {info['teacher_vocab']} ({info['exact']}) | "
                     f"{info['student_tokens']:.1f} / {info['teacher_tokens']:.1f} | {info['coverage']:.1%} | "
                     f"{info['unmapped_mass']:.1%} |")
    lines += ["", f"{gold.ARM}: TRL {version('trl')} GOLDTrainer (benchmarks/quality/gold.py): " + ", ".join(
        f"{k}={v}" for k, v in gold.GOLD_SETTINGS.items()) + ", the rest of GOLDConfig at its defaults; the same "
        "student, teacher of another tokenizer, rows, 150 steps of 32, lr 3e-3 (constant), scoring. GOLD's own data "
        "preparation refuses the character student (encode_with_byte_offsets: 'Cross-tokenizer ULD currently "
        "supports only ByteLevel BPE tokenizers'), so the rows are prepared as it prepares them (gold.gold_rows) "
        "and passed with skip_prepare_dataset."]
    for split, key in (("dev", "dev_metric"), ("test", "metric")):
        lines += ["", f"## {split} prompts", "", "| arm | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(cell(stats(runs, t, a, key)) for t in tasks) + " |" for a in names]
    lines += ["", "## Choice (dev) and targets", "",
              "Cross-tokenizer divergence chosen by the dev mean over the tasks (ties: the first listed): "
              + (", ".join(f"{a} {m:.1f}" for a, m in dev_means.items()) or "no arm has dev runs on every task yet")
              + "."]
    if chosen:
        lines += [f"Chosen: **{chosen}**; its test numbers are the ones reported.", "", *verdicts(runs, tasks, chosen)]
        lines += ["", f"Ratios of {chosen}'s mean to the other arms' means:", "",
                  f"| task | dev / {REFERENCE} | test / {REFERENCE} | test / {SFT} | test / {gold.ARM} |",
                  "|---|---|---|---|---|"]
        lines += [f"| {t} | " + " | ".join(ratio(runs, t, chosen, arm, key) for arm, key in (
            (REFERENCE, "dev_metric"), (REFERENCE, "metric"), (SFT, "metric"), (gold.ARM, "metric"))) + " |"
                  for t in tasks]
    lines += ["", f"{DEFAULT_ARM} trains cross_fkl's student (equal test and dev metric and xkd/distill per seed): " +
              "; ".join(f"{t} {same_student(runs, t)}" for t in tasks) + ".", "",
              "## Train seconds per run (mean)", "",
              "`axolotl train` wall time for the plugin's arms (start-up, data preparation, 150 steps, saving); for "
              f"{gold.ARM} the process's time from its start to the end of training (start-up, 150 steps).", "",
              "| arm | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for a in names:
        lines.append(f"| {a} | " + " | ".join("" if (s := stats(runs, t, a, "train_seconds")) is None else
                                              f"{s[0]:.0f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


# ---- BPE students: both space conventions (issue 32) -------------------------------------------------------


BPE_TASKS = ["arithmetic_v2"]
BPE_STYLES = ("byte_level", "sentencepiece")
STYLE_NAMES = {"byte_level": "byte-level", "sentencepiece": "sentencepiece-style"}
BPE_MERGES = 64
BPE_FOLDER = "bpe_students"
BPE_ARMS = [SFT, REFERENCE, "cross_fkl"]
EARLIER = "bpe_runs_before_12466a1.csv"
# target_agreement of the other teacher before 12466a1 (first 3 / later response positions), measured at a5b0e5d with
# the teachers cached under --work; the code that gave them is gone, so they are kept here for the report.
EARLIER_AGREEMENT = {"byte_level": (0.38, 0.799), "sentencepiece": (0.28, 0.953)}
BPE_FIELDS = ["task", "student", *(f for f in FIELDS if f != "task"), "code"]


def other_style(style: str) -> str:
    """The other space convention: the tokenizer of the cross-tokenizer teacher of a `style` student."""
    return BPE_STYLES[1 - BPE_STYLES.index(style)]


def bpe_vocab_size(texts: list[str], style: str) -> int:
    """tiny.build_bpe_tokenizer's vocab_size for BPE_MERGES merges: byte-level's base is the 256 bytes and the 4
    specials (BPE_VOCAB); sentencepiece-style's is the text's characters with `▁` for the space, and the 4 specials
    (its 256 byte-fallback tokens come on top)."""
    if style == "byte_level":
        return BPE_VOCAB
    return len(SPECIALS) + len(set("".join(texts).replace(" ", "\u2581")) | {"\u2581"}) + BPE_MERGES


def bpe_arms(same_teacher: Path, other_teacher: Path) -> dict[str, dict]:
    """Arm name -> `xkd:` block of study.train_one for a BPE student: sft, GKD with the teacher of its tokenizer,
    forward KL across tokenizers with the other one."""
    cross = {"source": "model", "path": str(other_teacher), "cross_tokenizer": True}
    return {SFT: study.METHODS["sft"],
            REFERENCE: {"divergence": "forward_kl", **study.REWARD_OFF,
                        "teacher": {"source": "model", "path": str(same_teacher)}},
            "cross_fkl": {"divergence": "forward_kl", **study.REWARD_OFF, "teacher": cross}}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prepare_bpe_data(task: Task, work: Path, args: argparse.Namespace) -> Path:
    """The study's training, test (eval) and dev rows of `task` (study.prepare_task's), written under
    work/task/bpe_students/data without training the study's character teacher."""
    from axolotl_xkd.tiny import write_jsonl

    folder = work / task.name / BPE_FOLDER / "data"
    settings = study.task_settings(task.name, args)
    stamp = folder / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return folder
    train, evaluation = task.splits(settings["train_rows"], settings["eval_rows"], seed=0)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "eval.jsonl", evaluation)
    write_jsonl(folder / "dev.jsonl", study.dev_rows(task, settings["train_rows"], settings["eval_rows"]))
    stamp.write_text(json.dumps(settings))
    return folder


def prepare_bpe_models(task_name: str, style: str, data: Path, work: Path, args: argparse.Namespace) -> dict:
    """Train (once, cached) the teacher over a `style` BPE tokenizer of `task_name`'s training text, and save the
    untrained student over the same tokenizer; returns their folders, the teacher's scores and training time."""
    import torch

    from axolotl_xkd.tiny import build_bpe_tokenizer, build_model, train_teacher

    task = TASKS[task_name]
    folder = work / task.name / BPE_FOLDER / style
    stamp = folder / "models.json"
    rows = read_rows(data / "train.jsonl")
    texts = [r["prompt"] + r["response"] for r in rows]
    settings = {**study.task_settings(task.name, args), "style": style, "vocab_size": bpe_vocab_size(texts, style)}
    paths = {"teacher": folder / "teacher", "student": folder / "student"}
    if stamp.is_file() and (info := json.loads(stamp.read_text())).get("settings") == settings:
        return {**info, **paths}
    tokenizer = build_bpe_tokenizer(texts, style=style, vocab_size=settings["vocab_size"])
    torch.manual_seed(0)
    teacher = build_model(tokenizer, hidden=settings["teacher_hidden"], layers=2, seed=0)
    started = time.perf_counter()
    loss = train_teacher(teacher, tokenizer, rows, steps=settings["teacher_steps"], seed=0)
    seconds = time.perf_counter() - started
    for name, model in (("teacher", teacher),
                        ("student", build_model(tokenizer, hidden=settings["student_hidden"], layers=2, seed=1))):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    info = {"settings": settings, "teacher_loss": loss, "teacher_seconds": round(seconds, 1), "vocab": len(tokenizer),
            **{f"teacher_{split}": study.evaluate(paths["teacher"], task, read_rows(data / f"{split}.jsonl"),
                                                  samples=0)["metric"] for split in ("eval", "dev")}}
    stamp.write_text(json.dumps(info))
    print(f"{task.name}: {style} teacher ({len(tokenizer)} tokens) trained in {seconds:.0f} s, test "
          f"{task.metric_name} {info['teacher_eval']:.1f}", flush=True)
    return {**info, **paths}


def pair_figures(aligner, student, teacher_tokenizer, teacher, sample: list[dict]) -> dict:
    """How a teacher's tokenizer cuts the student's responses in `sample`: teacher tokens with a student twin,
    response tokens per side, the aligned share of response positions, and the teacher's mass there on its tokens
    without a student twin (first 200 rows)."""
    def tokens(tokenizer) -> float:
        return statistics.fmean(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in sample)

    return {"exact": aligner.vocab.exact, "student_tokens": tokens(student),
            "teacher_tokens": tokens(teacher_tokenizer), "coverage": response_coverage(aligner, student, sample),
            "unmapped_mass": unmapped_mass(teacher, aligner, student, sample[:200])}


def bpe_alignment(student_path: Path, teacher_path: Path, same_path: Path, data: Path) -> dict:
    """How the other teacher's tokenizer cuts the student's responses (the first 500 training rows): mapped vocabulary,
    response tokens per side, the aligned share of response positions, the teacher's mass there on its tokens
    without a student twin, and (first 200 rows) target_agreement of the other teacher and of the same-tokenizer
    one (`same_path`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_xkd.cross_tokenizer import Aligner

    student, teacher = AutoTokenizer.from_pretrained(student_path), AutoTokenizer.from_pretrained(teacher_path)
    sample = read_rows(data / "train.jsonl")[:500]
    aligner = Aligner(student, teacher, "bpe students")
    model = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    return {**pair_figures(aligner, student, teacher, model, sample),
            **dict(zip(("same_first", "same_rest"), target_agreement(student, same_path, sample[:200]))),
            **dict(zip(("cross_first", "cross_rest"), target_agreement(student, teacher_path, sample[:200])))}


def target_agreement(student, teacher_path: Path, rows: list[dict], *, first: int = 3) -> tuple[float, float]:
    """Where the teacher's projected record (what cross_fkl's student is trained towards, in student ids) puts its
    most mass on the student's own next token: the share of the rows' first `first` response positions, and of the
    later ones (the EOS position included). With the student's own tokenizer the record is the teacher's own
    distribution, so the same numbers for the same-tokenizer teacher are the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_xkd.cross_tokenizer import Aligner
    from axolotl_xkd.teachers.aligned import AlignedTeacherSource

    model = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    source = AlignedTeacherSource(model, Aligner(student, AutoTokenizer.from_pretrained(teacher_path), "agreement"),
                                  top_k=64)
    hits: dict[bool, list[bool]] = {True: [], False: []}
    for row in rows:
        prompt = student(row["prompt"])["input_ids"]
        response = student(row["response"], add_special_tokens=False)["input_ids"] + [student.eos_token_id]
        ids = torch.tensor([prompt + response])
        signal = source.get_signal({"input_ids": ids, "labels": torch.tensor([[-100] * len(prompt) + response]),
                                    "attention_mask": torch.ones_like(ids)})
        for n, token in enumerate(response):  # position len(prompt) - 1 + n predicts response[n]
            logprobs, token_ids = signal.logprobs[0, len(prompt) - 1 + n], signal.token_ids[0, len(prompt) - 1 + n]
            top = int(token_ids[logprobs.argmax()]) if torch.isfinite(logprobs).any() else None
            hits[n < first].append(top == token)
    return statistics.fmean(hits[True]), statistics.fmean(hits[False])


def train_bpe_arm(task: Task, assets: dict[str, Path], work: Path, student: str, arm: str, xkd: dict, seed: int,
                  args: argparse.Namespace) -> dict:
    """study.train_one for the `student`-style BPE student (its own run folder); returns its bpe_runs.csv row, with
    the code it ran (`code`: the checkout's commit, `+dirty` where axolotl_xkd/ had changes not committed when it
    started; others edit the same checkout)."""
    git = partial(subprocess.run, capture_output=True, text=True, cwd=study.REPO, check=False)
    code = git(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
    code += "+dirty" if git(["git", "status", "--porcelain", "axolotl_xkd"]).stdout.strip() else ""
    row = study.train_one(task, assets, work, f"bpe_{student}_{arm}", seed, 1.0, args, xkd=xkd, dev_too=True)
    return {**row, "method": arm, "student": student, "code": code}


def bpe_stats(runs: list[dict], task: str, student: str, arm: str, key: str) -> tuple[float, float, int] | None:
    """stats() over the runs of the `student`-style student."""
    return stats([r for r in runs if r["student"] == student], task, arm, key)


def bpe_verdicts(runs: list[dict], task: str, student: str) -> list[str]:
    """The two targets of one direction with their numbers: cross_fkl's dev mean >= DEV_RATIO x gkd_same_fkl's, and
    its test mean >= sft's; a miss says by how much."""
    ours_dev, ref_dev = (bpe_stats(runs, task, student, a, "dev_metric") for a in ("cross_fkl", REFERENCE))
    ours, sft = (bpe_stats(runs, task, student, a, "metric") for a in ("cross_fkl", SFT))
    lines = []
    if ours_dev and ref_dev:
        ratio = ours_dev[0] / ref_dev[0] if ref_dev[0] else (1.0 if ours_dev[0] == 0 else float("inf"))
        miss = "" if ratio >= DEV_RATIO else f", {DEV_RATIO * ref_dev[0] - ours_dev[0]:.1f} points below the mark"
        lines.append(f"- dev mean >= {DEV_RATIO}x {REFERENCE}'s: **{'met' if not miss else 'missed'}**: "
                     f"{ours_dev[0]:.1f} / {ref_dev[0]:.1f} = {ratio:.2f}{miss}.")
    else:
        lines.append(f"- dev mean >= {DEV_RATIO}x {REFERENCE}'s: no runs of both yet.")
    if ours and sft:
        miss = "" if ours[0] >= sft[0] else f", {sft[0] - ours[0]:.1f} points below"
        lines.append(f"- test mean >= {SFT}'s: **{'met' if not miss else 'missed'}**: {ours[0]:.1f} vs "
                     f"{sft[0]:.1f}{miss}.")
    else:
        lines.append(f"- test mean >= {SFT}'s: no runs of both yet.")
    return lines


def bpe_report(runs: list[dict], tasks: list[str], models: dict, alignment: dict, command: str,
               earlier: list[dict] = ()) -> str:
    """bpe_students.md: the tokenizers and teachers, mean ± std per arm and direction on dev and test, the targets,
    the ratios to gkd_same_fkl and sft, the `earlier` runs (EARLIER: cross_fkl before 12466a1) and the train seconds.
    models[(task, style)]: prepare_bpe_models' info; alignment[(task, student style)]: bpe_alignment's."""
    directions = [(t, s) for t in tasks for s in BPE_STYLES]
    shown = BPE_ARMS
    label = {(t, s): f"{t}: {STYLE_NAMES[other_style(s)]} teacher -> {STYLE_NAMES[s]} student" for t, s in directions}
    counts = {}
    for r in runs:
        counts.setdefault((r["task"], r["student"]), {}).setdefault(r["method"], set()).add(r["seed"])
    lines = ["# Cross-tokenizer distillation into BPE students: quality (arithmetic_v2, CPU)", "",
             f"`{command}`. Mean ± std over seeds (n = seeds), greedy decoding, exact match in %, {len(runs)} runs. "
             "Protocol (fixed before the runs): benchmarks/quality/cross_tokenizer.py's docstring. Seeds finished: "
             + "; ".join(f"{label[d]}: " + ", ".join(f"{a} {len(counts.get(d, {}).get(a, ()))}" for a in shown)
                         for d in directions) + ".", "",
             "Tokenizers and teachers (hidden 128, 2 layers, 1500 steps on the same training rows; exact match of "
             "the teacher on the test and dev prompts):", "",
             "| task | tokenizer | vocab | teacher test | teacher dev | teacher training s |",
             "|---|---|---|---|---|---|"]
    for t, s in directions:
        info = models[(t, s)]
        lines.append(f"| {t} | {STYLE_NAMES[s]} | {info['vocab']} | {info['teacher_eval']:.1f} | "
                     f"{info['teacher_dev']:.1f} | {info['teacher_seconds']:.0f} |")
    lines += ["", "How the other teacher's tokenizer cuts the student's responses (first 500 training rows): teacher "
              "tokens with a student twin; response tokens per side; response positions whose prefix ends where a "
              "teacher token ends (the rest read the teacher inside one of its tokens); the teacher's probability "
              "there on its tokens without a student twin.", "",
              "| direction | teacher tokens mapped | response tokens student / teacher | response positions aligned | "
              "teacher mass without a twin |", "|---|---|---|---|---|"]
    for d in directions:
        a = alignment[d]
        lines.append(f"| {label[d]} | {a['exact']} | {a['student_tokens']:.1f} / {a['teacher_tokens']:.1f} | "
                     f"{a['coverage']:.1%} | {a['unmapped_mass']:.1%} |")
    lines += ["", "What each student is trained towards (first 200 training rows; no training involved): the share of "
              "response positions where the teacher's record, projected into the student's ids, puts its most mass "
              "on the student's own next token (the token the training text has there), at the first 3 response "
              "positions and at the later ones (EOS included); the same-tokenizer teacher's record is its own "
              "distribution.", "",
              "| direction | same-tokenizer teacher: first 3 / later | other teacher (cross_fkl): first 3 / later |",
              "|---|---|---|"]
    lines += [f"| {label[d]} | {alignment[d]['same_first']:.1%} / {alignment[d]['same_rest']:.1%} | "
              f"{alignment[d]['cross_first']:.1%} / {alignment[d]['cross_rest']:.1%} |" for d in directions]
    for split, key in (("dev", "dev_metric"), ("test", "metric")):
        lines += ["", f"## {split} prompts", "", "| arm | " + " | ".join(label[d] for d in directions) + " |",
                  "|---" * (len(directions) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(cell(bpe_stats(runs, *d, a, key)) for d in directions) + " |"
                  for a in shown]
    lines += ["", "## Targets", ""]
    for d in directions:
        lines += [f"{label[d]}:", "", *bpe_verdicts(runs, *d), ""]
    lines += ["Ratios of cross_fkl's mean to the other arms' means:", "",
              f"| direction | dev / {REFERENCE} | test / {REFERENCE} | dev / {SFT} | test / {SFT} |",
              "|---|---|---|---|---|"]
    for d in directions:
        sub = [r for r in runs if r["student"] == d[1]]
        lines.append(f"| {label[d]} | " + " | ".join(ratio(sub, d[0], "cross_fkl", arm, key) for arm, key in (
            (REFERENCE, "dev_metric"), (REFERENCE, "metric"), (SFT, "dev_metric"), (SFT, "metric"))) + " |")
    if earlier:
        lines += ["", "## The first cross_fkl runs, before 12466a1", "",
                  f"The same protocol's cross_fkl arm on the code before commit 12466a1 ({EARLIER}; the teacher read "
                  "the student's prompt and response as one text), mean ± std over seeds, dev then test:", "",
                  "| arm | " + " | ".join(f"{label[d]} dev | test" for d in directions) + " |",
                  "|---" * (2 * len(directions) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(cell(bpe_stats(earlier, *d, a, key)) for d in directions
                                           for key in ("dev_metric", "metric")) + " |"
                  for a in dict.fromkeys(r["method"] for r in earlier)]
        then = "; ".join(f"{EARLIER_AGREEMENT[s][0]:.1%} / {EARLIER_AGREEMENT[s][1]:.1%} of the first 3 / later "
                         f"response positions ({label[(t, s)]})" for t, s in directions if s in EARLIER_AGREEMENT)
        lines += ["", "Then the other teacher's record put its most mass on the student's own next token at " + then +
                  " (target_agreement at a5b0e5d): the teacher, trained on each part tokenized apart, read merged "
                  "tokens across the prompt's end (`=6+`) or a space before the response that it never saw there."]
    lines += ["", "## Train seconds per run (mean)", "",
              "`axolotl train` wall time (start-up, data preparation, 150 steps, saving), two runs at a time on 2 "
              "shared CPU cores, one thread each.", "",
              "| arm | " + " | ".join(label[d] for d in directions) + " |", "|---" * (len(directions) + 1) + "|"]
    for a in shown:
        lines.append(f"| {a} | " + " | ".join("" if (s := bpe_stats(runs, *d, a, "train_seconds")) is None else
                                              f"{s[0]:.0f}" for d in directions) + " |")
    return "\n".join(lines) + "\n"


def bpe_main(args: argparse.Namespace) -> None:
    """The BPE-student study (the protocol in the module docstring): prepare, train what bpe_runs.csv lacks, report."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    tasks = args.tasks or BPE_TASKS
    csv_path = args.out / "bpe_runs.csv"
    data = {t: prepare_bpe_data(TASKS[t], args.work, args) for t in tasks}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:  # the teachers, in parallel
        futures = {(t, s): pool.submit(prepare_bpe_models, t, s, data[t], args.work, args)
                   for t in tasks for s in BPE_STYLES}
        models = {key: future.result() for key, future in futures.items()}
    alignment = {(t, s): bpe_alignment(models[(t, s)]["student"], models[(t, other_style(s))]["teacher"],
                                       models[(t, s)]["teacher"], data[t])
                 for t in tasks for s in BPE_STYLES}
    if not args.report_only:
        done = {(r["task"], r["student"], r["method"], int(r["seed"])) for r in study.read_runs(csv_path)}
        jobs = []
        for seed in range(args.seeds):  # seed-major: an interrupted study has every arm at its first seeds
            for t in tasks:
                for s in BPE_STYLES:
                    assets = {"student": models[(t, s)]["student"], "tokenizer": models[(t, s)]["student"],
                              "teacher": models[(t, s)]["teacher"], "data": data[t]}
                    table = bpe_arms(models[(t, s)]["teacher"], models[(t, other_style(s))]["teacher"])
                    jobs += [partial(train_bpe_arm, TASKS[t], assets, args.work, s, arm, xkd, seed, args)
                             for arm, xkd in table.items() if (t, s, arm, seed) not in done]
        study.run_all(jobs, csv_path, args.jobs, "cross-tokenizer study, BPE students", fields=BPE_FIELDS)
    command = ("python -m benchmarks.quality.cross_tokenizer " + " ".join(
        a for a in sys.argv[1:] if a != "--report-only")).strip()
    text = bpe_report(study.read_runs(csv_path), tasks, models, alignment, command, study.read_runs(args.out / EARLIER))
    (args.out / "bpe_students.md").write_text(text)
    print(text)


# ---- driver -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = study.follow_up_parser(__doc__.splitlines()[0])
    parser.set_defaults(tasks=None, samples=0, out=study.REPO / "benchmarks" / "results" / "quality" /
                        "cross_tokenizer")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--divergences", nargs="+", default=DEFAULT_DIVERGENCES, choices=list(DIVERGENCES),
                        help="the cross_<d> arms (default: %(default)s)")
    parser.add_argument("--no-gold", action="store_true", help="leave out the TRL GOLD arm")
    parser.add_argument("--bpe-students", action="store_true",
                        help="the BPE-student study instead (docstring; default task: " + " ".join(BPE_TASKS) + ")")
    parser.add_argument("--report-only", action="store_true", help="with --bpe-students: rewrite its report only")
    args = study.follow_up_args(parser)
    if args.bpe_students:
        return bpe_main(args)
    args.tasks = args.tasks or DEFAULT_TASKS
    csv_path = args.out / "runs.csv"
    assets = {t: study.prepare_task(TASKS[t], args.work, args) for t in args.tasks}
    teachers = {t: prepare_other_teacher(TASKS[t], assets[t], args.work, args) for t in args.tasks}
    for t in args.tasks:
        teachers[t]["same_metric"] = json.loads((args.work / t / "assets.json").read_text())["teacher_metric"]
    done = {(r["task"], r["method"], int(r["seed"])) for r in study.read_runs(csv_path)}
    jobs = []
    for seed in range(args.seeds):  # seed-major: an interrupted study has every arm at its first seeds
        for t in args.tasks:
            table = arms(teachers[t]["path"], args.divergences)
            jobs += [partial(study.train_one, TASKS[t], assets[t], args.work, arm, seed, 1.0, args, xkd=xkd,
                             dev_too=True) for arm, xkd in table.items() if (t, arm, seed) not in done]
            if not args.no_gold and (t, gold.ARM, seed) not in done:
                jobs.append(partial(run_gold, t, seed, teachers[t]["path"], args))
    study.run_all(jobs, csv_path, args.jobs, "cross-tokenizer study", fields=FIELDS)
    command = ("python -m benchmarks.quality.cross_tokenizer " + " ".join(sys.argv[1:])).strip()
    text = report(study.read_runs(csv_path), args.tasks, teachers, [f"cross_{d}" for d in args.divergences], command)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
