"""TRL's GOLD trainer (trl.experimental.gold: cross-tokenizer ULD, the hybrid loss) as the baseline of the
cross-tokenizer study: the same student, teacher of another tokenizer, data, steps, batch, learning rate and scoring,
trained outside Axolotl and outside this plugin. One run per process (accelerate's state is per process):

    python -m benchmarks.quality.gold TASK SEED --teacher DIR [--steps 150] [--work runs/quality]

prints the run's CSV row (benchmarks/quality/cross_tokenizer.py starts it and collects the row).

GOLD's own dataset preparation (GOLDTrainer._prepare_dataset_with_original_text and DataCollatorForChatML) computes
the student's byte offsets with trl.experimental.utils.encode_with_byte_offsets, which raises NotImplementedError for
a student tokenizer that is not byte-level BPE ("Cross-tokenizer ULD currently supports only ByteLevel BPE
tokenizers"); the study's student keeps its character tokenizer. So the rows are prepared here (`gold_rows`) and
handed to GOLD with `dataset_kwargs={"skip_prepare_dataset": True}`: the columns its preparation writes, computed as
it computes them (completion-relative byte offsets, the EOS string appended to the completion text), except that the
student's prompt starts with its BOS, as Axolotl trains it and study.evaluate prompts it. The teacher's inputs, the
alignment, the merge and the loss are GOLD's, unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.quality import study
from benchmarks.quality.tasks import TASKS

ARM = "trl_gold_off"
# GOLD's cross-tokenizer settings (TRL's GOLD page: use_uld_loss for a teacher of another tokenizer, the hybrid loss
# comparing exact vocabulary matches directly); off-policy (lmbda 0). Every other loss setting is GOLDConfig's default.
GOLD_SETTINGS = {"use_uld_loss": True, "use_extended_uld": True, "uld_use_hybrid_loss": True, "lmbda": 0.0}


def gold_rows(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """Prompt/response rows as GOLD's dataset preparation writes them, for a student tokenizer it refuses.

    input_ids: the prompt with the tokenizer's BOS, then the response and the EOS; completion_mask marks the response
    and EOS; byte_offsets: (0, 0) on the prompt, each completion token's UTF-8 byte span relative to the completion
    text, which is the response followed by the EOS string (GOLD appends it before tokenizing, so its EOS spans that
    string). Rows longer than max_length are dropped, as Axolotl drops them at sequence_len.
    """
    eos = tokenizer.eos_token
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion_text = row["response"] + eos
        encoding = tokenizer.backend_tokenizer.encode(completion_text, add_special_tokens=False)
        char_to_byte = [0]
        for char in completion_text:
            char_to_byte.append(char_to_byte[-1] + len(char.encode("utf-8")))
        offsets = [(char_to_byte[start], char_to_byte[end]) for start, end in encoding.offsets]
        ids = prompt + list(encoding.ids)
        if len(ids) > max_length:
            continue
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                    "completion_mask": [0] * len(prompt) + [1] * len(encoding.ids),
                    "byte_offsets": [(0, 0)] * len(prompt) + offsets,
                    "original_prompt_text": row["prompt"], "original_completion_text": completion_text})
    return out


def train_gold(task: str, seed: int, teacher: Path, args: argparse.Namespace) -> dict:
    """One GOLD run on the task's full training data; scored on the test prompts (metric) and the dev prompts
    (dev_metric) like the study's runs; its weights deleted; returns its CSV row."""
    import psutil
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    torch.set_num_threads(args.threads)
    assets = study.asset_paths(task, args.work)  # prepared by the parent process
    if args.student is not None:  # a control: another student (and its data), e.g. the BPE students' study's
        assets = {**assets, "student": args.student, "data": args.data or assets["data"]}
    name = ARM if args.student is None else f"{ARM}-{args.student.name}-{teacher.parent.name}"
    out = args.work / task / "runs" / f"{name}-seed{seed}"
    tokenizer = AutoTokenizer.from_pretrained(assets["student"])
    rows = [json.loads(line) for line in (assets["data"] / "train.jsonl").read_text().splitlines()]
    config = GOLDConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=32, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        seed=seed, data_seed=seed, logging_steps=max(1, args.steps // 5), save_strategy="no", report_to="none",
        bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0, max_length=study.SEQUENCE_LEN,
        max_completion_length=study.MAX_NEW_TOKENS, teacher_tokenizer_name_or_path=str(teacher),
        dataset_kwargs={"skip_prepare_dataset": True}, **GOLD_SETTINGS,
    )
    model = AutoModelForCausalLM.from_pretrained(assets["student"], attn_implementation="sdpa")
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, attn_implementation="sdpa")
    trainer = GOLDTrainer(model=model, teacher_model=teacher_model, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(gold_rows(tokenizer, rows, study.SEQUENCE_LEN)))
    trainer.train()
    seconds = time.time() - psutil.Process().create_time()  # start-up included, as `axolotl train`'s seconds are
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(out / "model")
    split = {name: [json.loads(line) for line in (assets["data"] / f"{name}.jsonl").read_text().splitlines()]
             for name in ("eval", "dev")}
    scores = study.evaluate(out / "model", TASKS[task], split["eval"], samples=args.samples, seed=seed)
    scores["dev_metric"] = study.evaluate(out / "model", TASKS[task], split["dev"], samples=0)["metric"]
    shutil.rmtree(out, ignore_errors=True)
    return {"task": task, "method": ARM, "seed": seed, "data_fraction": 1.0, "metric_name": TASKS[task].metric_name,
            **scores, "steps": args.steps, "train_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=list(TASKS))
    parser.add_argument("seed", type=int)
    parser.add_argument("--teacher", type=Path, required=True, help="the teacher of another tokenizer (a folder)")
    parser.add_argument("--student", type=Path, default=None,
                        help="a student folder other than the task's (a control: e.g. a byte-level BPE student)")
    parser.add_argument("--data", type=Path, default=None, help="with --student: the folder of its train/dev/eval.jsonl")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--samples", type=int, default=0, help="samples per test prompt for the diversity measures")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=study.REPO / "runs" / "quality")
    args = parser.parse_args()
    print(json.dumps(train_gold(args.task, args.seed, args.teacher, args)))


if __name__ == "__main__":
    main()
