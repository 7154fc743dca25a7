"""The defaults keep the reward terms away from the student: an X-KD run with them trains the very student a plain
GKD run (the reward terms off) trains, whatever the divergence, while its reward head learns; and it logs the same
`loss` (the student's objective), with `ppl` only where the loss computes a cross-entropy."""

from __future__ import annotations

from pathlib import Path

import math

import pytest
import torch
from safetensors.torch import load_file

from axolotl_xkd.reward_store import WEIGHTS_NAME
from tests.support import log_history, trained

pytestmark = pytest.mark.e2e

STEPS = 6


@pytest.mark.parametrize(("divergence", "alpha_ce"), [pytest.param("jsd", 0.0, id="jsd"),
                                                     pytest.param("forward_kl", 0.5, id="forward_kl+ce")])
def test_default_student_is_the_gkd_student(tiny_assets, tmp_path, divergence, alpha_ce):
    """JSD is the divergence that collapsed with the coupled TD term; forward KL the study's main arm. The
    student's weights after the X-KD run equal the GKD run's bit for bit, and so do the logged gradient norms,
    divergences and `loss` (the head's gradient is clipped apart from the student's, its terms are logged under xkd/
    only), while the head has trained. Axolotl's ppl = exp(loss) would be exp of a divergence: ppl is exp(CE) where
    alpha_ce > 0 computes one, and absent otherwise."""
    common = {"max_steps": STEPS, "save_steps": STEPS, "logging_steps": 1, "max_grad_norm": 0.05}
    settings = {"divergence": divergence, "alpha_ce": alpha_ce}
    runs = {
        "gkd": trained(tiny_assets, tmp_path / "gkd", {
            **common, "xkd": {**settings, "td_weight": 0.0, "reward_kl_weight": 0.0}}),
        "xkd": trained(tiny_assets, tmp_path / "xkd", {**common, "xkd": settings}),
    }
    logs = {name: [e for e in log_history(out) if "loss" in e] for name, out in runs.items()}
    assert len(logs["xkd"]) == len(logs["gkd"]) == STEPS
    for gkd, xkd in zip(logs["gkd"], logs["xkd"], strict=True):
        assert xkd["grad_norm"] == gkd["grad_norm"] and xkd["xkd/distill"] == gkd["xkd/distill"], (gkd, xkd)
        assert xkd["loss"] == gkd["loss"], (gkd, xkd)
        assert xkd["loss"] == pytest.approx(xkd["xkd/distill"] + alpha_ce * xkd["xkd/ce"], rel=1e-5, abs=1e-5)
        assert xkd["xkd/td_nll"] != 0.0
        for entry in (gkd, xkd):
            if alpha_ce > 0:
                assert entry["ppl"] == pytest.approx(math.exp(entry["xkd/ce"]), rel=1e-4), entry
            else:
                assert "ppl" not in entry, entry
    assert logs["gkd"][0]["grad_norm"] > common["max_grad_norm"]  # clipping was active on every run
    students = {name: load_file(out / "model.safetensors") for name, out in runs.items()}
    start = load_file(Path(tiny_assets["student"]) / "model.safetensors")
    for key, tensor in students["gkd"].items():
        assert torch.equal(students["xkd"][key], tensor), key
    assert any(not torch.equal(start[k], students["gkd"][k]) for k in start)  # the student did train
    head = load_file(runs["xkd"] / WEIGHTS_NAME)
    assert any(t.abs().sum() > 0 for t in head.values())  # the mean weights start at 0
    assert not (runs["gkd"] / WEIGHTS_NAME).exists()
