"""TRL's own GKDTrainer and MiniLLMTrainer as independent baselines for the quality study: same teacher, student, data,
steps, batch, learning rate and scoring, trained outside Axolotl and outside this plugin.

    python -m benchmarks.quality.trl_baselines [--seeds 3] [--jobs 2] [--tasks ...] [--methods ...]
    python -m benchmarks.quality.trl_baselines --tune-minillm [--seeds 3]

Checks that the study's GKD arms (X-KD with the reward terms off, through `axolotl train`) are a fair
GKD, and measures the paper's other named baseline. GKD arms: TRL's generalized JSD with beta 0 (forward KL in TRL's convention) and beta 0.5, off-policy
(lmbda 0) and on-policy (lmbda 0.5, temperature 1, the study's max_new_tokens); MiniLLM: TRL's defaults
with 4 samples per prompt, 32 sequences per step, the same completion length. The GKD rows are tokenized
as prompt tokens (with BOS) + response tokens + EOS, passed to TRL's DataCollatorForChatML pre-tokenized
with a completion mask. Each run is scored by study.evaluate and appended to the study's runs.csv as
`trl_*`; table.md and the plot are rewritten. Run study.py first (it builds the cached teachers).

--tune-minillm: MiniLLM collapses at the study's learning rate, so its learning rate is tuned as the
X-KD sweep tunes X-KD, for MiniLLM from scratch and from an SFT start (`trl_minillm_sft`, the MiniLLM
paper's recipe: half the steps SFT, half MiniLLM): one seed per rate in MINILLM_LRS on every task,
scored on the dev split (minillm_sweep.csv / .md); the rate with the highest mean over tasks of its
dev metric divided by the best rate's on that task then trains --seeds seeds scored on the test
split, as `ARM_lrR` (`ARM` at the study's rate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from benchmarks.quality import study
from benchmarks.quality.tasks import TASKS, Task

ARMS: dict[str, dict] = {
    "trl_gkd_fkl_off": {"beta": 0.0, "lmbda": 0.0},
    "trl_gkd_jsd_off": {"beta": 0.5, "lmbda": 0.0},
    "trl_gkd_jsd_on": {"beta": 0.5, "lmbda": 0.5},
    # MiniLLM (policy gradient on the reverse KL, on top of TRL's GRPO): 8 prompts x 4 samples = 32 sequences
    # per step, the study's micro batch.
    "trl_minillm": {"num_generations": 4},
    # The MiniLLM paper's recipe: SFT first (TRL's SFTTrainer, half the steps, the study's rate), then MiniLLM.
    "trl_minillm_sft": {"num_generations": 4},
}
SFT_INIT = {"trl_minillm_sft"}
STUDY_LR = 0.003
MINILLM_LRS = (3e-3, 1e-3, 3e-4, 1e-4)


def method_name(method: str, lr: float) -> str:
    """The runs.csv name of a TRL arm: the arm, with its learning rate when it is not the study's."""
    return method if lr == STUDY_LR else f"{method}_lr{lr:g}"


def tokenized_rows(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """prompt (+BOS) + response + EOS token ids and a completion mask; rows longer than max_length are
    dropped, as Axolotl drops them at sequence_len."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(response) <= max_length:
            out.append({"prompt": row["prompt"], "input_ids": prompt + response,
                        "completion_mask": [0] * len(prompt) + [1] * len(response)})
    return out


def train_trl(task: Task, assets: dict[str, Path], work: Path, method: str, seed: int,
              args: argparse.Namespace) -> dict:
    """One TRL run on the task's training data (args.fraction of it), scored like the study's runs (with
    args.temperatures, also its samples at each: study.sampled)."""
    import shutil

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

    torch.set_num_threads(args.threads)
    out = work / task.name / "runs" / f"{method}-seed{seed}-data{args.fraction:g}"
    tokenizer = AutoTokenizer.from_pretrained(assets["student"])
    rows = [json.loads(line) for line in (assets["data"] / study.data_file(args.fraction)).read_text().splitlines()]
    common = dict(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=32, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", seed=seed, data_seed=seed, logging_steps=max(1, args.steps // 5), save_strategy="no",
        report_to="none", bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0, temperature=1.0,
        **ARMS[method],
    )
    model = AutoModelForCausalLM.from_pretrained(assets["student"], attn_implementation="sdpa")
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], attn_implementation="sdpa")
    started = time.perf_counter()
    if method in SFT_INIT:
        from trl import SFTConfig, SFTTrainer

        sft = {**common, "output_dir": str(out / "sft"), "max_steps": args.steps // 2, "learning_rate": STUDY_LR}
        for key in (*ARMS[method], "temperature"):
            sft.pop(key)
        SFTTrainer(model=model, args=SFTConfig(max_length=study.SEQUENCE_LEN, completion_only_loss=True, **sft),
                   train_dataset=Dataset.from_list(tokenized_rows(tokenizer, rows, study.SEQUENCE_LEN)),
                   processing_class=tokenizer).train()
        common["max_steps"] = args.steps - args.steps // 2
    if method.startswith("trl_minillm"):
        dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
        config = MiniLLMConfig(max_completion_length=study.MAX_NEW_TOKENS, **common)
        trainer = MiniLLMTrainer(model=model, teacher_model=teacher, args=config, train_dataset=dataset,
                                 processing_class=tokenizer)
    else:
        dataset = Dataset.from_list(tokenized_rows(tokenizer, rows, study.SEQUENCE_LEN))
        config = GKDConfig(max_length=study.SEQUENCE_LEN, max_new_tokens=study.MAX_NEW_TOKENS, **common)
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=config, train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(out / "model")
    evaluation = [json.loads(line) for line in (assets["data"] / f"{args.split}.jsonl").read_text().splitlines()]
    scores = study.evaluate(out / "model", task, evaluation, samples=args.samples, seed=seed)
    if args.temperatures:
        scores["sampled"] = json.dumps(study.sampled(out / "model", task, evaluation, samples=args.samples,
                                                     temperatures=tuple(args.temperatures), seed=seed))
    shutil.rmtree(out, ignore_errors=True)
    return {"task": task.name, "method": method_name(method, args.lr), "seed": seed, "data_fraction": args.fraction,
            "metric_name": task.metric_name, **scores, "steps": args.steps, "train_seconds": round(seconds, 1)}


def run_subprocess(task: str, method: str, seed: int, args: argparse.Namespace, *, lr: float = STUDY_LR,
                   split: str = "eval", fraction: float = 1.0, temperatures: tuple[float, ...] = ()) -> dict:
    """train_trl in its own process (accelerate's state is per process); returns its CSV row."""
    import subprocess

    command = [sys.executable, "-m", "benchmarks.quality.trl_baselines", "--one", task, method, str(seed),
               "--steps", str(args.steps), "--samples", str(args.samples), "--threads", str(args.threads),
               "--work", str(args.work), "--lr", str(lr), "--split", split, "--fraction", str(fraction),
               "--temperatures", *map(str, temperatures)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=study.REPO, env={**os.environ,
                          "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = study.follow_up_parser(__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("TASK", "METHOD", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tune-minillm", action="store_true", help="tune MiniLLM's learning rate on dev, then test")
    parser.add_argument("--lr", type=float, default=STUDY_LR, help=argparse.SUPPRESS)
    parser.add_argument("--split", choices=("eval", "dev"), default="eval", help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--temperatures", type=float, nargs="*", default=[], help=argparse.SUPPRESS)
    args = study.follow_up_args(parser)
    if args.one:
        task, method, seed = args.one
        assets = study.asset_paths(task, args.work)  # prepared by the parent process
        print(json.dumps(train_trl(TASKS[task], assets, args.work, method, int(seed), args)))
        return
    for t in args.tasks:
        study.prepare_task(TASKS[t], args.work, args)
    runs_csv = args.out / "runs.csv"
    done = {(r["task"], r["method"], int(r["seed"])) for r in study.read_runs(runs_csv)}
    if args.tune_minillm:
        jobs = []
        for method in ("trl_minillm", "trl_minillm_sft"):
            lr = tune_minillm(args, method)
            jobs += [partial(run_subprocess, t, method, s, args, lr=lr) for s in range(args.seeds)
                     for t in args.tasks if (t, method_name(method, lr), s) not in done]
    else:
        jobs = [partial(run_subprocess, t, m, s, args)
                for s in range(args.seeds) for t in args.tasks for m in args.methods if (t, m, s) not in done]
    study.run_all(jobs, runs_csv, args.jobs, "TRL baselines")
    command = ("python -m benchmarks.quality.trl_baselines " + " ".join(sys.argv[1:])).strip()
    study.report(args, study.read_runs(runs_csv), f"python -m benchmarks.quality.study && {command}")


def tune_minillm(args: argparse.Namespace, method: str) -> float:
    """`method` (a MiniLLM arm) at each rate of MINILLM_LRS, one seed, scored on dev; writes minillm_sweep.csv /
    .md and returns the chosen rate (highest mean over tasks of dev metric / the best rate's dev metric)."""
    sweep_csv = args.out / "minillm_sweep.csv"
    done = {(r["task"], r["method"]) for r in study.read_runs(sweep_csv)}
    jobs = [partial(run_subprocess, t, method, 0, args, lr=lr, split="dev")
            for lr in MINILLM_LRS for t in args.tasks if (t, method_name(method, lr)) not in done]
    study.run_all(jobs, sweep_csv, args.jobs, f"{method} learning rates (dev)")
    dev = {(r["task"], r["method"]): float(r["metric"]) for r in study.read_runs(sweep_csv)}
    best = {t: max(dev[(t, method_name(method, lr))] for lr in MINILLM_LRS) for t in args.tasks}
    score = {lr: statistics.fmean(dev[(t, method_name(method, lr))] / max(best[t], 1e-9) for t in args.tasks)
             for lr in MINILLM_LRS}
    chosen = max(MINILLM_LRS, key=lambda lr: score[lr])
    lines = [f"## {method}", "",
             "| learning rate | " + " | ".join(args.tasks) + " | mean of metric / best rate's |",
             "|---|" + "---:|" * (len(args.tasks) + 1)]
    for lr in MINILLM_LRS:
        cells = " | ".join(f"{dev[(t, method_name(method, lr))]:.1f}" for t in args.tasks)
        lines.append(f"| {lr:g}{' (chosen)' if lr == chosen else ''} | {cells} | {score[lr]:.2f} |")
    report = args.out / "minillm_sweep.md"
    sections = {}
    if report.is_file():
        for part in report.read_text().split("\n## ")[1:]:
            sections[part.split("\n", 1)[0].strip()] = "## " + part.strip()
    sections[method] = "\n".join(lines)
    header = ["# MiniLLM learning rate on the dev split", "",
              "`python -m benchmarks.quality.trl_baselines --tune-minillm` (TRL MiniLLMTrainer, 1 seed per rate, dev "
              "prompts held out from training and test; `trl_minillm_sft`: TRL's SFTTrainer for half the steps at "
              "the study's rate, then MiniLLM at the tuned rate).", ""]
    report.write_text("\n".join(header) + "\n" + "\n\n".join(sections[m] for m in sorted(sections)) + "\n")
    print(sections[method])
    return chosen


if __name__ == "__main__":
    main()
