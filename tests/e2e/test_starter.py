"""End to end: the starter block of docs/getting_started.md grafted onto a plain SFT config trains the student
plain GKD trains, with the reward head learning beside it; a setting that collapsed in the study warns once."""

from __future__ import annotations

from pathlib import Path

import pytest

from axolotl_xkd.args import XKDConfig, collapse_risk
from tests.support import base_config, log_history, merged, train, write_config
from tests.unit.test_starter_config import COUPLED, starter_snippet

pytestmark = pytest.mark.e2e

STEPS = 12


def run(tiny_assets, out: Path, xkd: dict, steps: int = STEPS) -> tuple[list[dict], str]:
    """Train the tiny SFT config plus the plugin line and `xkd`; returns its loss entries and its output."""
    config = merged(base_config(tiny_assets, out), {"max_steps": steps, "save_steps": steps})
    config["plugins"] = starter_snippet()["plugins"]
    config["xkd"] = {**xkd, "teacher": {"source": "model", "path": str(tiny_assets["teacher"])}}
    proc = train(write_config(out / "cfg.yml", config))
    return [e for e in log_history(Path(config["output_dir"])) if "loss" in e], proc.stdout + proc.stderr


def test_starter_block_trains_the_gkd_student(tiny_assets, tmp_path):
    starter = starter_snippet()["xkd"]
    xkd, output = run(tiny_assets, tmp_path / "xkd", starter)
    gkd, _ = run(tiny_assets, tmp_path / "gkd", {**starter, "td_weight": 0.0, "reward_kl_weight": 0.0})
    distill = [e["xkd/distill"] for e in xkd]
    assert len(distill) == STEPS
    assert sum(distill[-3:]) < sum(distill[:3]) and distill[-1] < distill[0], distill
    print(f"final xkd/distill: starter {distill[-1]:.4f}, GKD {gkd[-1]['xkd/distill']:.4f}; "
          f"final td_nll {xkd[-1]['xkd/td_nll']:.4f}, reward_kl {xkd[-1]['xkd/reward_kl']:.4f}, "
          f"reward_sigma {xkd[-1]['xkd/reward_sigma']:.4f}")
    assert distill == [e["xkd/distill"] for e in gkd]  # the reward terms never reach the student
    assert xkd[-1]["xkd/td_nll"] < xkd[0]["xkd/td_nll"]  # while the head learns the teacher's log-probs
    assert "setting that collapsed" not in output and "risks collapse" not in output


def test_collapse_setting_warns_once_at_start(tiny_assets, tmp_path):
    xkd = {"divergence": "jsd", "beta": 0.5, "td_weight": 1.0, "reward_kl_weight": 1.0, **COUPLED}
    message = collapse_risk(XKDConfig(teacher={"source": "model", "path": "t"}, **xkd))
    _, output = run(tiny_assets, tmp_path, xkd, steps=1)
    assert output.count("xkd.divergence: jsd with xkd.td_weight 1.0 is a setting that collapsed") == 1, output[-4000:]
    assert message.split(" (JSD")[0] in output
