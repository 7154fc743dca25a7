"""End to end: `xkd.mixture: route` with each Axolotl `datasets:` entry naming its teacher (`xkd_teacher:` in the
entry, no route column): Axolotl's own preparation keeps every row's teacher, row by row, in the train split and in a
`test_datasets` eval split, and training serves each teacher its entry's rows and evaluates; a name that no teacher
has is refused before any data is prepared."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support import base_config, log_history, merged, run_cli, train, write_config

pytestmark = pytest.mark.e2e


def entry_config(assets: dict[str, Path], out: Path, teachers: tuple[str, str]) -> dict:
    """Two entries, the additions and the subtractions of the tiny data, each naming a teacher; two in-process
    teachers (the same model twice: the routing is under test)."""
    rows = [json.loads(line) for line in (assets["data"] / "train.jsonl").read_text().splitlines()]
    base = base_config(assets, out)
    entry = base["datasets"][0]
    entries = []
    for op, teacher in zip("+-", teachers):
        path = out / "data" / f"{'add' if op == '+' else 'sub'}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if op in r["prompt"]))
        entries.append({**entry, "path": str(path), "xkd_teacher": teacher})
    config = merged(base, {"max_steps": 3, "logging_steps": 1, "save_steps": 10, "datasets": entries,
                           "xkd": {"teachers": [{"name": "add", "source": "model", "path": str(assets["teacher"])},
                                                {"name": "sub", "source": "model", "path": str(assets["teacher"])}],
                                   "mixture": "route"}})
    config["xkd"].pop("teacher")
    return config


def test_each_entry_routes_its_rows_to_its_teacher(untrained_assets, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from axolotl_xkd.keys import ROUTE

    config = entry_config(untrained_assets, tmp_path, ("add", "sub"))
    config["test_datasets"] = [{**config["datasets"][1], "split": "train"}]  # the subtractions again, as eval rows
    config.update(eval_strategy="steps", eval_steps=2)
    cfg = write_config(tmp_path / "cfg.yml", config)
    run_cli(["python", "-m", "axolotl.cli.preprocess", str(cfg)])
    saved = {p.parent for p in (tmp_path / "prepared").glob("xkd-route-*/**/*.arrow")}
    assert len(saved) == 2, saved  # the train split and the eval split
    tokenizer = AutoTokenizer.from_pretrained(untrained_assets["tokenizer"])
    counts = []
    for folder in saved:
        prepared = load_from_disk(str(folder))
        seen = {0: 0, 1: 0}
        for ids, route, labels in zip(prepared["input_ids"], prepared[ROUTE], prepared["labels"]):
            assert len(set(route)) == 1 and len(route) == len(ids) == len(labels)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            assert route[0] == (0 if "+" in text else 1), (text, route[0])
            seen[route[0]] += 1
        counts.append(seen)
    evaluation = [c for c in counts if c[0] == 0]  # the eval split: subtractions only, each routed to `sub`
    training = [c for c in counts if c[0] > 0]
    assert len(evaluation) == len(training) == 1 and evaluation[0][1] > 10, counts
    assert training[0][0] > 10 and training[0][1] > 10, counts

    train(cfg)
    history = log_history(Path(config["output_dir"]))
    evaluated = [e for e in history if "eval_loss" in e]
    assert evaluated and all(math.isfinite(e["eval_loss"]) for e in evaluated), history
    # The eval split is all subtractions: its own shares, logged apart from the training steps'.
    assert all(e["eval_xkd/teacher/sub/share"] == 1.0 and e["eval_xkd/teacher/add/share"] == 0.0 for e in evaluated)
    logs = [e for e in history if "loss" in e]
    assert len(logs) == 3 and all(math.isfinite(e["loss"]) for e in logs)
    for e in logs:
        add, sub = e["xkd/teacher/add/share"], e["xkd/teacher/sub/share"]
        assert add + sub == pytest.approx(1.0, abs=1e-6) and 0 < add < 1, e


def test_an_entry_naming_no_teacher_is_refused_before_the_data_is_prepared(untrained_assets, tmp_path):
    config = entry_config(untrained_assets, tmp_path, ("add", "mul"))
    proc = train(write_config(tmp_path / "cfg.yml", config), check=False)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "datasets[1].xkd_teacher 'mul' is not one of xkd.teachers' names ['add', 'sub']" in logs, logs[-3000:]
    assert not (tmp_path / "prepared").exists()
