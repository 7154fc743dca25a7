"""The CPU demo's steps around `axolotl train` (scripts/demo.sh runs them):

    python -m scripts.demo configs --out runs/tiny   # the data split, four configs (example_configs/xkd_tiny.yml)
    python -m scripts.demo answers --out runs/tiny   # the stored teacher answers as text, for SFT on them
    python -m scripts.demo report --out runs/tiny    # exact-match table of the students, the untrained one, the teacher
    python -m scripts.demo score --out runs/tiny FOLDER...  # exact match of other models (folders under OUT)

The case distillation is for: a strong teacher, many prompts, few gold answers. `configs` keeps the gold answers of
the first LABELLED rows of OUT/data/train.jsonl (OUT/data/labelled.jsonl) and the prompts of all of them without
answers (OUT/data/prompts.jsonl), then writes, from the example config with its `runs/tiny/...` paths moved under
OUT: sft.yml (plain SFT on the labelled rows: the example without the plugin line and the `xkd:` block), xkd.yml (the
example on the same labelled rows), xkd_teacher.yml (X-KD on the teacher's greedy answers to every prompt, stored
once by `axolotl xkd precompute OUT/xkd_teacher.yml`) and sft_teacher.yml (plain SFT, as sft.yml, on the same answers:
`answers` writes them from that store as OUT/data/teacher_answers.jsonl, so both arms train on the same text; the
pair isolates what the teacher's distribution adds to its answers). All four train the same student with the same
steps, batch and optimizer. `report` greedy-decodes OUT/data/eval.jsonl with transformers on the CPU
(axolotl_xkd.tiny.greedy_exact_matches) and writes OUT/exact_match.json beside the printed table. Needs torch and
transformers, not axolotl. A repository tool (it reads example_configs/), run from the checkout's root: not in the
installed package.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "example_configs" / "xkd_tiny.yml"
EXAMPLE_ROOT = "runs/tiny"  # the folder the example's paths point into
ANSWERS = "teacher_answers.jsonl"  # OUT/data/: the teacher's stored answers as text (`answers`)
LABELLED = 32  # gold answers kept: the rest of the training rows count as prompts without answers
# Optimizer steps of every student: enough for the student on the teacher's answers to learn most of the task, while
# SFT on 32 rows has long memorised them (docs/demo.md); the example config's 64 steps are its quick default.
STEPS = 256
# (table label, folder under OUT, the data it trained on): the models the report compares
MODELS = (
    ("untrained student", "student", "-"),
    ("plain SFT", "sft_student", f"{LABELLED} labelled rows"),
    ("X-KD, same data", "xkd_student", f"{LABELLED} labelled rows"),
    ("SFT, teacher answers", "sft_teacher_student", "teacher's answers to every prompt"),
    ("X-KD, teacher answers", "xkd_teacher_student", "teacher's answers to every prompt"),
    ("teacher", "teacher", "(trained on every row)"),
)


def relocated(value: object, out: str) -> object:
    """`value` with every string path under EXAMPLE_ROOT moved under `out`, recursively."""
    if isinstance(value, dict):
        return {key: relocated(item, out) for key, item in value.items()}
    if isinstance(value, list):
        return [relocated(item, out) for item in value]
    if isinstance(value, str) and (value == EXAMPLE_ROOT or value.startswith(EXAMPLE_ROOT + "/")):
        return out + value[len(EXAMPLE_ROOT):]
    return value


def demo_configs(base: dict, out: str, seed: int = 42, steps: int = STEPS) -> dict[str, dict]:
    """The demo's configs in `out` by file stem: `base` relocated, on the labelled rows, for `steps` steps with `seed`
    (xkd); the same without the plugin and the `xkd:` block (sft); X-KD on the teacher's answers to every prompt
    (xkd_teacher); and sft on those answers as text (sft_teacher, OUT/data/teacher_answers.jsonl, written by
    `answers` from xkd_teacher's store), each in its own output and prepared-data folders."""
    xkd = {**relocated(base, out), "max_steps": steps, "save_steps": max(1, steps // 2),
           "logging_steps": max(1, steps // 8), "seed": seed}
    (dataset,) = xkd["datasets"]
    xkd["datasets"] = [{**dataset, "path": f"{out}/data/labelled.jsonl"}]
    sft = {key: value for key, value in xkd.items() if key != "xkd"}
    sft["plugins"] = [p for p in sft.get("plugins", []) if not p.startswith("axolotl_xkd")]
    if not sft["plugins"]:
        del sft["plugins"]
    sft["output_dir"] = f"{out}/sft_student"
    sft["dataset_prepared_path"] = f"{out}/prepared_sft"
    teacher_path = xkd["xkd"]["teacher"]["path"]
    on_answers = {
        **xkd,
        "xkd": {**xkd["xkd"], "teacher": {"source": "precomputed", "path": f"{out}/teacher_answers",
                                          "model_path": teacher_path, "top_k": 16},
                "sequences": "teacher", "generation": {"temperature": 0.0, "max_new_tokens": 8}},
        "datasets": [{**dataset, "path": f"{out}/data/prompts.jsonl"}],
        "output_dir": f"{out}/xkd_teacher_student",
        "dataset_prepared_path": f"{out}/prepared_teacher",
    }
    sft_on_answers = {**sft, "datasets": [{**dataset, "path": f"{out}/data/{ANSWERS}"}],
                      "output_dir": f"{out}/sft_teacher_student",
                      "dataset_prepared_path": f"{out}/prepared_sft_teacher"}
    return {"xkd": xkd, "sft": sft, "xkd_teacher": on_answers, "sft_teacher": sft_on_answers}


def teacher_answers(out: Path) -> dict[str, int]:
    """OUT/data/teacher_answers.jsonl: every row of the store `axolotl xkd precompute OUT/xkd_teacher.yml` wrote
    (OUT/teacher_answers, split train), decoded to a prompt and the teacher's answer, in the store's order. Axolotl
    tokenizes such a row back into the store's tokens (the character tokenizer round-trips every string) and appends
    EOS: the same rows as the X-KD arm's, except an answer cut at `max_new_tokens` before its EOS, which gains one
    (counted as `without_eos`; 0 in docs/demo.md's runs). Returns the row counts."""
    from transformers import AutoTokenizer

    from axolotl_xkd.store.format import Manifest
    from axolotl_xkd.store.read import load_split

    store = out / "teacher_answers"
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    rows, without_eos = [], 0
    for row in load_split(store, Manifest.read(store), "train"):
        ids, labels = row["input_ids"], row["labels"]
        start = next(i for i, label in enumerate(labels) if label != -100)
        answer = ids[start:]
        if answer and answer[-1] == tokenizer.eos_token_id:
            answer = answer[:-1]
        else:
            without_eos += 1
        rows.append({"prompt": tokenizer.decode(ids[:start], skip_special_tokens=True),
                     "response": tokenizer.decode(answer, skip_special_tokens=True)})
    (out / "data" / ANSWERS).write_text("".join(json.dumps(item) + "\n" for item in rows))
    return {"rows": len(rows), "without_eos": without_eos}


def split_data(out: Path, labelled: int = LABELLED) -> None:
    """OUT/data/labelled.jsonl (the first `labelled` training rows with their answers) and OUT/data/prompts.jsonl
    (every training prompt, without an answer: the teacher answers them)."""
    rows = read_jsonl(out / "data" / "train.jsonl")
    for name, items in (("labelled.jsonl", rows[:labelled]),
                        ("prompts.jsonl", [{"prompt": row["prompt"], "response": ""} for row in rows])):
        (out / "data" / name).write_text("".join(json.dumps(item) + "\n" for item in items))


def write_configs(out: str, base_path: Path = EXAMPLE, seed: int = 42, steps: int = STEPS) -> list[Path]:
    """Split the data and write OUT/{xkd,sft,xkd_teacher,sft_teacher}.yml (see demo_configs); returns their paths."""
    split_data(Path(out))
    paths = []
    for stem, config in demo_configs(yaml.safe_load(base_path.read_text()), out.rstrip("/"), seed, steps).items():
        path = Path(out) / f"{stem}.yml"
        path.write_text(f"# {stem} config of the demo, written by `python -m scripts.demo configs` from "
                        f"{base_path.name}\n" + yaml.safe_dump(config, sort_keys=False))
        paths.append(path)
    return paths


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """The rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(out: Path, models: tuple[tuple[str, str, str], ...] = MODELS) -> dict:
    """Greedy exact match of each (label, folder under OUT, data) of `models` on OUT/data/eval.jsonl, overall and on
    the rows whose prompt never occurs in OUT/data/train.jsonl."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_xkd.tiny import greedy_exact_matches

    rows = read_jsonl(out / "data" / "eval.jsonl")
    seen = {row["prompt"] for row in read_jsonl(out / "data" / "train.jsonl")}
    unseen = [row["prompt"] not in seen for row in rows]
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    results = {}
    for label, folder, data in models:
        model = AutoModelForCausalLM.from_pretrained(out / folder, dtype=torch.float32).eval()
        matches = greedy_exact_matches(model, tokenizer, rows)
        results[label] = {"model": str(out / folder), "data": data, "exact": sum(matches),
                          "unseen_exact": sum(m and u for m, u in zip(matches, unseen))}
    return {"rows": len(rows), "unseen_rows": sum(unseen), "models": results}


def table(report: dict, steps: int | None) -> str:
    """The report as a small text table."""
    rows, unseen = report["rows"], report["unseen_rows"]
    budget = f"{steps} optimizer steps each" if steps else "the same optimizer steps"
    header = (f"Greedy exact match on the {rows} eval rows (none is a training row; {unseen} of their prompts never "
              f"occur in training). Students: the same student, {budget}.")
    lines = [header, f"  {'model':<24} {'trained on':<36} {'eval rows':>10} {'unseen':>8}"]
    for label, result in report["models"].items():
        overall = f"{result['exact']}/{rows} {result['exact'] / max(rows, 1):4.0%}"
        lines.append(f"  {label:<24} {result['data']:<36} {overall:>10} {result['unseen_exact']:>5}/{unseen}")
    lines.append("The teacher's row depends on the CPU (its training rounds differently on Intel and AMD), and the "
                 "students' rows with it: docs/demo.md gives the spread over seeds.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    configs = commands.add_parser("configs", help="split the data; write OUT/{xkd,sft,xkd_teacher,sft_teacher}.yml")
    configs.add_argument("--out", default=EXAMPLE_ROOT, help=f"the demo's folder (default: {EXAMPLE_ROOT})")
    configs.add_argument("--base", type=Path, default=EXAMPLE, help="X-KD config to derive from")
    configs.add_argument("--seed", type=int, default=42, help="the training runs' seed (default: 42, the example's)")
    configs.add_argument("--steps", type=int, default=STEPS, help=f"every student's optimizer steps (default: {STEPS})")
    answers = commands.add_parser("answers", help=f"the stored teacher answers as text: OUT/data/{ANSWERS}")
    report = commands.add_parser("report", help="print the exact-match table and write OUT/exact_match.json")
    score = commands.add_parser("score", help="print the exact match of other models (folders under OUT)")
    score.add_argument("folders", nargs="+", help="model folders under OUT")
    for command in (answers, report, score):
        command.add_argument("--out", type=Path, default=Path(EXAMPLE_ROOT),
                             help=f"the demo's folder (default: {EXAMPLE_ROOT})")
    args = parser.parse_args()
    if args.command == "configs":
        for path in write_configs(args.out, args.base, args.seed, args.steps):
            print(f"demo: wrote {path}", flush=True)
        return
    if args.command == "answers":
        counts = teacher_answers(args.out)
        print(f"demo: wrote {args.out / 'data' / ANSWERS}: the teacher's {counts['rows']} stored answers as text, "
              f"{counts['without_eos']} cut before their EOS", flush=True)
        return
    if args.command == "score":
        result = evaluate(args.out, tuple((folder, folder, "-") for folder in args.folders))
        for folder, item in result["models"].items():
            print(f"{folder}: {item['exact']}/{result['rows']} ({item['unseen_exact']}/{result['unseen_rows']} "
                  "unseen)", flush=True)
        return
    result = evaluate(args.out)
    (args.out / "exact_match.json").write_text(json.dumps(result, indent=2) + "\n")
    steps = yaml.safe_load((args.out / "sft.yml").read_text()).get("max_steps")
    print(table(result, steps), flush=True)


if __name__ == "__main__":
    main()
