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
    """The README's first command, every stage at a few steps: the five models scored, the table printed with the
    JSON's numbers, the SFT run without the plugin, the teacher's answers stored, the plot and the hints."""
    out = tmp_path / "demo"
    stdout = run_demo(out, teacher_steps=100, steps=8)
    assert_demo_outputs(out, stdout, steps=8)


def assert_demo_outputs(out: Path, stdout: str, *, steps: int) -> None:
    """What every demo run must leave: the table (as printed and as JSON), the runs, the store, the plot, the hints."""
    report = json.loads((out / "exact_match.json").read_text())
    models = report["models"]
    assert list(models) == ["untrained student", "plain SFT", "X-KD, same data", "X-KD, teacher answers", "teacher"]
    assert report["rows"] == 64
    # The printed table carries the same numbers.
    for label, result in models.items():
        assert any(line.strip().startswith(label) and f" {result['exact']}/64 " in line
                   for line in stdout.splitlines()), (label, stdout[-3000:])

    # The SFT run is the X-KD config without the plugin, on the same budget: no X-KD metrics, no reward head.
    sft, xkd = log_history(out / "sft_student"), log_history(out / "xkd_student")
    on_answers = log_history(out / "xkd_teacher_student")
    assert not any(key.startswith("xkd/") for entry in sft for key in entry)
    assert any(key.startswith("xkd/") for entry in xkd for key in entry)
    assert not (out / "sft_student" / "xkd_reward_head.safetensors").exists()
    assert sft[-1]["step"] == xkd[-1]["step"] == on_answers[-1]["step"] == steps
    # The teacher answered every training prompt (precompute --generate), the labelled rows only 32 of them.
    assert len((out / "data" / "labelled.jsonl").read_text().splitlines()) == 32
    manifest = json.loads((out / "teacher_answers" / "manifest.json").read_text())
    assert manifest["sequences"] == "teacher" and manifest["splits"]["train"] == 512

    assert (out / "xkd_loss_terms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Loss terms plot: {out / 'xkd_loss_terms.png'}" in stdout
    for hint in ("axolotl xkd score --model", "xkd_tiny_on_policy.yml", "plugins: line and the xkd: block",
                 f"Running this demo again deletes and rewrites {out}."):
        assert hint in stdout
