"""End to end: `bash scripts/demo.sh` as the README runs it, in a temporary folder (XKD_DEMO_OUT), then its table,
plot and closing hints. In CI with a few steps of each training (XKD_TEACHER_STEPS, XKD_DEMO_STEPS): every stage runs
and reports; the demo's claim (distillation on the teacher's answers beats SFT on the labelled rows) needs its full
budget, about 10 minutes of CPU, so that case is `slow` (`bash scripts/test.sh -m slow tests/e2e/test_demo.py`);
docs/demo.md has its figures over three seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, cli_env, log_history

pytestmark = pytest.mark.e2e



def run_demo(out: Path, teacher_steps: int, steps: int | None = None) -> str:
    """`bash scripts/demo.sh` into `out`; its stdout."""
    env = cli_env({"XKD_DEMO_OUT": str(out), "XKD_TEACHER_STEPS": str(teacher_steps), "XKD_VENV": sys.prefix,
                   **({"XKD_DEMO_STEPS": str(steps)} if steps else {})})
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-8000:]}"
    # Progress while the teacher trains: a line every 100 steps, then its total time.
    assert f"tiny teacher: step {teacher_steps}/{teacher_steps}, loss" in proc.stdout
    assert f"tiny teacher: {teacher_steps} steps in " in proc.stdout
    return proc.stdout


@pytest.mark.slow
def test_demo_table_shows_distillation_on_unlabelled_prompts_beats_sft_on_the_labelled_rows(tmp_path):
    out = tmp_path / "demo"
    stdout = run_demo(out, teacher_steps=400)
    models = json.loads((out / "exact_match.json").read_text())["models"]
    # What distillation is for: the teacher's answers to prompts without gold answers beat SFT on the few gold ones.
    assert models["X-KD, teacher answers"]["exact"] > models["plain SFT"]["exact"], models
    assert models["X-KD, same data"]["exact"] > models["untrained student"]["exact"], models
    assert_demo_outputs(out, stdout, steps=256)


def test_demo_runs_every_stage_and_reports(tmp_path):
    """The README's first command, every stage at a few steps: the six models scored, the table printed with the
    JSON's numbers, the SFT runs without the plugin, the teacher's answers stored and the SFT arm on the same rows, the
    plot and the hints."""
    out = tmp_path / "demo"
    stdout = run_demo(out, teacher_steps=100, steps=8)
    assert_demo_outputs(out, stdout, steps=8)


def assert_demo_outputs(out: Path, stdout: str, *, steps: int) -> None:
    """What every demo run must leave: the table (as printed and as JSON), the runs, the store, the plot, the hints."""
    report = json.loads((out / "exact_match.json").read_text())
    models = report["models"]
    assert list(models) == ["untrained student", "plain SFT", "X-KD, same data", "SFT, teacher answers",
                            "X-KD, teacher answers", "teacher"]
    assert report["rows"] == 64
    # The printed table carries the same numbers.
    for label, result in models.items():
        assert any(line.strip().startswith(label) and f" {result['exact']}/64 " in line
                   for line in stdout.splitlines()), (label, stdout[-3000:])

    # The SFT runs are the X-KD config without the plugin, on the same budget: no X-KD metrics, no reward head.
    sft, xkd = log_history(out / "sft_student"), log_history(out / "xkd_student")
    on_answers, sft_on_answers = log_history(out / "xkd_teacher_student"), log_history(out / "sft_teacher_student")
    for plain, folder in ((sft, "sft_student"), (sft_on_answers, "sft_teacher_student")):
        assert not any(key.startswith("xkd/") for entry in plain for key in entry)
        assert not (out / folder / "xkd_reward_head.safetensors").exists()
    assert any(key.startswith("xkd/") for entry in xkd for key in entry)
    assert sft[-1]["step"] == xkd[-1]["step"] == on_answers[-1]["step"] == sft_on_answers[-1]["step"] == steps
    # The teacher answered every training prompt (precompute --generate), the labelled rows only 32 of them.
    assert len((out / "data" / "labelled.jsonl").read_text().splitlines()) == 32
    manifest = json.loads((out / "teacher_answers" / "manifest.json").read_text())
    assert manifest["sequences"] == "teacher" and manifest["splits"]["train"] == 512
    assert_sft_trains_on_the_stored_answers(out)

    assert (out / "xkd_loss_terms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Loss terms plot: {out / 'xkd_loss_terms.png'}" in stdout
    for hint in ("axolotl xkd score --model", "xkd_tiny_on_policy.yml", "plugins: line and the xkd: block",
                 f"Running this demo again deletes and rewrites {out}."):
        assert hint in stdout


def assert_sft_trains_on_the_stored_answers(out: Path) -> None:
    """SFT on the teacher's answers trains on the X-KD arm's rows: Axolotl's tokenized rows of
    data/teacher_answers.jsonl are the store's rows (an answer cut before its EOS gains one), in any order."""
    from datasets import load_from_disk

    from axolotl_xkd.store.format import Manifest
    from axolotl_xkd.store.read import load_split

    eos = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())["eos_token"]
    eos_id = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"][eos]
    store = load_split(out / "teacher_answers", Manifest.read(out / "teacher_answers"), "train")
    (prepared,) = [d for d in (out / "prepared_sft_teacher").iterdir() if d.is_dir()]
    sft = load_from_disk(str(prepared))

    def rows(dataset, fix_eos: bool) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        pairs = []
        for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
            if fix_eos and ids[-1] != eos_id:
                ids, labels = [*ids, eos_id], [*labels, eos_id]
            pairs.append((tuple(ids), tuple(labels)))
        return sorted(pairs)

    assert len(sft) == len(store) == 512
    assert rows(sft, fix_eos=False) == rows(store, fix_eos=True)
