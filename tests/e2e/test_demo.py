"""End to end: `bash scripts/demo.sh` as the README runs it, in a temporary folder (XKD_DEMO_OUT) and with a
shorter teacher training (XKD_TEACHER_STEPS), then its table, plot and closing hints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import BIN, ENV, REPO, log_history

pytestmark = pytest.mark.e2e

TEACHER_STEPS = 400


def test_demo_table_shows_distillation_on_unlabelled_prompts_beats_sft_on_the_labelled_rows(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, **ENV, "XKD_DEMO_OUT": str(out), "XKD_TEACHER_STEPS": str(TEACHER_STEPS),
           "XKD_VENV": sys.prefix, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-8000:]}"
    stdout = proc.stdout

    # Progress while the teacher trains: a line every 100 steps, then its total time.
    assert f"tiny teacher: step {TEACHER_STEPS}/{TEACHER_STEPS}, loss" in stdout
    assert f"tiny teacher: {TEACHER_STEPS} steps in " in stdout

    report = json.loads((out / "exact_match.json").read_text())
    models = report["models"]
    assert list(models) == ["untrained student", "plain SFT", "X-KD, same data", "X-KD, teacher answers", "teacher"]
    assert report["rows"] == 64
    # What distillation is for: the teacher's answers to prompts without gold answers beat SFT on the few gold ones.
    assert models["X-KD, teacher answers"]["exact"] > models["plain SFT"]["exact"], report
    assert models["X-KD, same data"]["exact"] > models["untrained student"]["exact"], report
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
    assert sft[-1]["step"] == xkd[-1]["step"] == on_answers[-1]["step"] > 0
    # The teacher answered every training prompt (precompute --generate), the labelled rows only 32 of them.
    assert len((out / "data" / "labelled.jsonl").read_text().splitlines()) == 32
    manifest = json.loads((out / "teacher_answers" / "manifest.json").read_text())
    assert manifest["sequences"] == "teacher" and manifest["splits"]["train"] == 512

    assert (out / "xkd_loss_terms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Loss terms plot: {out / 'xkd_loss_terms.png'}" in stdout
    for hint in ("axolotl xkd score --model", "xkd_tiny_on_policy.yml", "plugins: line and the xkd: block",
                 f"Running this demo again deletes and rewrites {out}."):
        assert hint in stdout
