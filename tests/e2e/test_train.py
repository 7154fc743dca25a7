"""End to end: a plain Axolotl SFT config plus the plugin line and an `xkd:` block, trained for real
with `axolotl train` on the CPU."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from axolotl_xkd.options import PRESETS
from tests.support import base_config, log_history, merged, teacher_with_extra_token, train, write_config

pytestmark = pytest.mark.e2e

XKD_METRICS = ("xkd/distill", "xkd/ce", "xkd/reward_kl", "xkd/td_nll", "xkd/reward_mu", "xkd/reward_sigma")


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory):
    """One X-KD training run of 6 steps, checkpoints at 3 and 6; returns (config, output dir, process)."""
    tmp = tmp_path_factory.mktemp("xkd_run")
    config = base_config(tiny_assets, tmp)
    # lambda = w_kl = 1 stated (the defaults are 0.1): the loss-sum check below weights every component by 1.
    config["xkd"].update({"divergence": "jsd", "beta": 0.5, "alpha_ce": 0.1, "td_weight": 1.0,
                          "reward_kl_weight": 1.0})
    proc = train(write_config(tmp / "cfg.yml", config), console=True)  # the `axolotl train` console script
    return config, Path(config["output_dir"]), proc


def test_trains_and_logs_every_component(run):
    _, out, proc = run
    assert "axolotl_xkd 0.1.0 active" in proc.stdout + proc.stderr
    losses = [e for e in log_history(out) if "loss" in e]
    assert len(losses) == 6
    for entry in losses:
        assert math.isfinite(entry["loss"])
        for key in XKD_METRICS:
            assert key in entry and math.isfinite(entry[key]), (key, entry)
    assert losses[-1]["loss"] < losses[0]["loss"]
    # With the defaults the reward terms train only the head: the logged loss is the student's objective, the
    # weighted sum of the logged distillation and CE terms, and ppl the CE's perplexity.
    for entry in losses:
        assert entry["loss"] == pytest.approx(entry["xkd/distill"] + 0.1 * entry["xkd/ce"], rel=1e-4)
        assert entry["ppl"] == pytest.approx(math.exp(entry["xkd/ce"]), rel=1e-4)
    assert losses[0]["xkd/reward_kl"] + losses[0]["xkd/td_nll"] > 0.1  # the head's terms, left out of `loss`
    assert not any("xkd/td_force" in e for e in losses)  # measured only where the TD term pulls on the student


def test_coupled_preset_trains_and_logs_the_whole_objective(tiny_assets, tmp_path):
    """`preset: coupled` trains the spec's coupled form, and the start-up line shows its effective settings. Where
    the reward terms reach the student, `loss` is everything it trains on; no CE, so no ppl."""
    config = merged(base_config(tiny_assets, tmp_path), {"max_steps": 2, "save_steps": 2,
                                                         "xkd": {"preset": "coupled", "divergence": "forward_kl"}})
    proc = train(write_config(tmp_path / "cfg.yml", config))
    active = re.search(r"axolotl_xkd \S+ active: (\{.*\})", proc.stdout + proc.stderr)
    assert active, (proc.stdout + proc.stderr)[-3000:]
    coupled = PRESETS["coupled"]
    assert {key: json.loads(active[1])[key] for key in coupled} == coupled
    logs = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
    assert len(logs) == 2
    for entry in logs:
        whole = (entry["xkd/distill"] + coupled["reward_kl_weight"] * entry["xkd/reward_kl"]
                 + coupled["td_weight"] * entry["xkd/td_nll"])
        assert entry["loss"] == pytest.approx(whole, rel=1e-4) and "ppl" not in entry, entry
        # The TD term pulls on the student's Q: both pulls on the logits are measured at every logging step.
        assert entry["xkd/td_force"] > 0 and entry["xkd/kd_force"] > 0, entry


def test_reward_head_saved_beside_student_and_checkpoints(run):
    _, out, _ = run
    for folder in (out, out / "checkpoint-3", out / "checkpoint-6"):
        assert (folder / "xkd_reward_head.safetensors").is_file()
        config = json.loads((folder / "xkd_reward_head.json").read_text())
        assert config["hidden_size"] == 32 and config["reward_input"] == "next_state"
    weights = load_file(out / "xkd_reward_head.safetensors")
    assert set(weights) == {"proj.weight", "proj.bias"} and weights["proj.weight"].abs().sum() > 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "xkd" in k]


def test_student_loads_with_plain_transformers(run):
    _, out, _ = run
    code = (
        "import sys; sys.modules['axolotl_xkd'] = None; sys.modules['axolotl'] = None\n"
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m, info = AutoModelForCausalLM.from_pretrained({str(out)!r}, output_loading_info=True)\n"
        "assert not any(info.values()), info\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = tok('12+34=', return_tensors='pt').input_ids\n"
        "print('logits', tuple(m(ids).logits.shape))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "logits (1, 7, " in proc.stdout


def test_resume_restores_reward_head_bit_for_bit(run, tmp_path):
    """Resuming at checkpoint-3 restores the head exactly: step 4 (computed with the restored head before
    any update) logs the same loss and reward statistics as the uninterrupted run, bit for bit, and the
    run ends with the same head."""
    config, out, _ = run
    checkpoint = out / "checkpoint-3"
    assert load_file(checkpoint / "xkd_reward_head.safetensors")["proj.weight"].abs().sum() > 0
    cont = merged(config, {"output_dir": str(tmp_path / "cont"), "resume_from_checkpoint": str(checkpoint)})
    proc = train(write_config(tmp_path / "cont.yml", cont))
    assert f"X-KD reward head restored from {checkpoint}" in proc.stdout + proc.stderr
    resumed = {e["step"]: e for e in log_history(tmp_path / "cont") if "loss" in e}
    straight = {e["step"]: e for e in log_history(out) if "loss" in e}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's state
    for step in (4, 5, 6):
        for key in ("loss", "xkd/reward_mu", "xkd/reward_sigma", "xkd/td_nll"):
            assert resumed[step][key] == straight[step][key], (step, key)
    final_resumed = load_file(tmp_path / "cont" / "xkd_reward_head.safetensors")
    final_straight = load_file(out / "xkd_reward_head.safetensors")
    for key in final_straight:
        assert torch.equal(final_resumed[key], final_straight[key]), key


def test_mismatched_teacher_vocabulary_is_refused(tiny_assets, tmp_path):
    other = teacher_with_extra_token(tmp_path / "other_teacher", hidden=32)
    config = merged(base_config(tiny_assets, tmp_path), {"xkd": {"teacher": {"path": str(other)}}})
    proc = train(write_config(tmp_path / "cfg.yml", config), check=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert f"xkd.teacher.path={str(other)!r}" in message and "differs from the student's" in message
    assert "'<extra>'" in message


def test_example_llama_config_passes_validation():
    """example_configs/xkd_llama.yml (hub models, not downloadable here) passes Axolotl's validation."""
    code = (
        "import yaml\n"
        "from axolotl.cli.config import prepare_plugins\n"
        "from axolotl.utils.config import validate_config\n"
        "from axolotl.utils.dict import DictDefault\n"
        "cfg = DictDefault(yaml.safe_load(open('example_configs/xkd_llama.yml')))\n"
        "prepare_plugins(cfg)\n"
        "cfg = validate_config(cfg)\n"
        "assert cfg.xkd['divergence'] == 'forward_kl' and cfg.xkd['teacher']['source'] == 'model', cfg.xkd\n"
        "assert cfg.sample_packing and cfg.deepspeed\n"
        "print('valid')\n"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 0 and "valid" in proc.stdout, proc.stderr[-3000:]


def test_fused_chunked_loss_equals_unchunked_reference(tiny_assets, tmp_path):
    """The default training path (chunked loss fused with the output layer, teacher logits formed per
    chunk from its hidden states) logs the same losses as the unchunked reference path."""
    logged = {}
    for name, chunk in (("fused", 5), ("reference", 0)):
        config = merged(base_config(tiny_assets, tmp_path / name), {
            "max_steps": 2, "save_steps": 2,
            "xkd": {"chunk_size": chunk, "divergence": "jsd", "alpha_ce": 0.2, "td_target": "teacher_expected"},
        })
        train(write_config(tmp_path / f"{name}.yml", config))
        logged[name] = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
    for fused, reference in zip(logged["fused"], logged["reference"], strict=True):
        for key in ("loss", *XKD_METRICS):
            assert fused[key] == pytest.approx(reference[key], rel=1e-4, abs=2e-6), key
