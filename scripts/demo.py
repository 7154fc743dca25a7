"""The CPU demo's two steps around `axolotl train` (scripts/demo.sh runs them):

    python -m scripts.demo configs --out runs/tiny   # OUT/xkd.yml and OUT/sft.yml from example_configs/xkd_tiny.yml
    python -m scripts.demo report --out runs/tiny    # exact-match table: untrained, X-KD, plain SFT, teacher

`configs` moves the example's `runs/tiny/...` paths under OUT and derives the plain SFT config by removing
the plugin line and the `xkd:` block, so both students get the same data, steps and optimizer. `report`
greedy-decodes OUT/data/eval.jsonl with transformers on the CPU (axolotl_xkd.tiny.greedy_exact_matches) and
writes OUT/exact_match.json beside the printed table. Needs torch and transformers, not axolotl. A repository
tool (it reads example_configs/), run from the checkout's root: not in the installed package.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "example_configs" / "xkd_tiny.yml"
EXAMPLE_ROOT = "runs/tiny"  # the folder the example's paths point into
# (table label, folder under OUT): the models the report compares, weakest expected first
MODELS = (
    ("untrained student", "student"),
    ("X-KD student", "xkd_student"),
    ("plain SFT student", "sft_student"),
    ("teacher", "teacher"),
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


def demo_configs(base: dict, out: str) -> tuple[dict, dict]:
    """(X-KD config, plain SFT config) for a demo in `out`: `base` relocated, and the SFT one without the plugin
    and the `xkd:` block, in its own output and prepared-data folders."""
    xkd = relocated(base, out)
    sft = {key: value for key, value in xkd.items() if key != "xkd"}
    sft["plugins"] = [p for p in sft.get("plugins", []) if not p.startswith("axolotl_xkd")]
    if not sft["plugins"]:
        del sft["plugins"]
    sft["output_dir"] = f"{out}/sft_student"
    sft["dataset_prepared_path"] = f"{out}/prepared_sft"
    return xkd, sft


def write_configs(out: str, base_path: Path = EXAMPLE) -> tuple[Path, Path]:
    """Write OUT/xkd.yml and OUT/sft.yml (see demo_configs); returns their paths."""
    xkd, sft = demo_configs(yaml.safe_load(base_path.read_text()), out.rstrip("/"))
    paths = Path(out) / "xkd.yml", Path(out) / "sft.yml"
    for path, config, what in zip(paths, (xkd, sft), ("X-KD", "plain SFT")):
        path.write_text(f"# {what} config of the demo, written by `python -m scripts.demo configs` from "
                        f"{base_path.name}\n" + yaml.safe_dump(config, sort_keys=False))
    return paths


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """The rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(out: Path) -> dict:
    """Greedy exact match of each model in MODELS on OUT/data/eval.jsonl, overall and on the rows whose prompt
    never occurs in OUT/data/train.jsonl."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_xkd.tiny import greedy_exact_matches

    rows = read_jsonl(out / "data" / "eval.jsonl")
    seen = {row["prompt"] for row in read_jsonl(out / "data" / "train.jsonl")}
    unseen = [row["prompt"] not in seen for row in rows]
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    results = {}
    for label, folder in MODELS:
        model = AutoModelForCausalLM.from_pretrained(out / folder, dtype=torch.float32).eval()
        matches = greedy_exact_matches(model, tokenizer, rows)
        results[label] = {"model": str(out / folder), "exact": sum(matches),
                          "unseen_exact": sum(m and u for m, u in zip(matches, unseen))}
    return {"rows": len(rows), "unseen_rows": sum(unseen), "models": results}


def table(report: dict, steps: int | None) -> str:
    """The report as a small text table."""
    rows, unseen = report["rows"], report["unseen_rows"]
    budget = f" ({steps} steps each)" if steps else ""
    header = (f"Greedy exact match on the {rows} eval rows (none is in the training file; {rows - unseen} of their "
              f"prompts also occur there, {unseen} never do). Students: the same data and budget{budget}.")
    lines = [header, f"  {'model':<20} {'eval rows':>12} {'unseen prompts':>16}"]
    for label, result in report["models"].items():
        overall = f"{result['exact']}/{rows} {result['exact'] / max(rows, 1):4.0%}"
        lines.append(f"  {label:<20} {overall:>12} {result['unseen_exact']:>12}/{unseen}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    configs = commands.add_parser("configs", help="write OUT/xkd.yml and OUT/sft.yml from the example config")
    configs.add_argument("--out", default=EXAMPLE_ROOT, help=f"the demo's folder (default: {EXAMPLE_ROOT})")
    configs.add_argument("--base", type=Path, default=EXAMPLE, help="X-KD config to derive from")
    report = commands.add_parser("report", help="print the exact-match table and write OUT/exact_match.json")
    report.add_argument("--out", type=Path, default=Path(EXAMPLE_ROOT), help=f"the demo's folder (default: {EXAMPLE_ROOT})")
    args = parser.parse_args()
    if args.command == "configs":
        for path in write_configs(args.out, args.base):
            print(f"demo: wrote {path}", flush=True)
        return
    result = evaluate(args.out)
    (args.out / "exact_match.json").write_text(json.dumps(result, indent=2) + "\n")
    steps = yaml.safe_load((args.out / "sft.yml").read_text()).get("max_steps")
    print(table(result, steps), flush=True)


if __name__ == "__main__":
    main()
