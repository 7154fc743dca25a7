"""End to end, on whichever supported Axolotl release is installed (CI runs 0.19 and 0.21): gradient
accumulation, `axolotl merge-lora` with the reward head, and the `module:Class` plugin line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from packaging.version import Version

from axolotl_xkd.compat import axolotl_version, merge_hook_available, merge_instructions
from axolotl_xkd.reward_store import CONFIG_NAME, WEIGHTS_NAME
from tests.support import base_config, log_history, merged, run_cli, train, write_config

pytestmark = pytest.mark.e2e


def _trained(tiny_assets, folder: Path, overrides: dict) -> tuple[Path, str]:
    config = merged(base_config(tiny_assets, folder), overrides)
    proc = train(write_config(folder / "cfg.yml", config), console=True)
    return Path(config["output_dir"]), proc.stdout + proc.stderr


def test_gradient_accumulation_equals_one_large_micro_batch(tiny_assets, tmp_path):
    """The X-KD loss is a sum over response tokens divided by the step's `num_items_in_batch`; two micro-batches
    of 8 accumulated must give the gradients of one micro-batch of 16 (Axolotl 0.21 overrides
    `_get_num_items_in_batch` and `training_step`, so this is checked on every release)."""
    common = {"max_steps": 2, "save_steps": 2, "xkd": {"alpha_ce": 0.1}}
    runs = {}
    for name, micro, accumulation in (("accumulated", 8, 2), ("large", 16, 1)):
        runs[name] = _trained(tiny_assets, tmp_path / name, {
            **common, "micro_batch_size": micro, "gradient_accumulation_steps": accumulation})[0]
    logs = {name: [e for e in log_history(out) if "loss" in e] for name, out in runs.items()}
    for accumulated, large in zip(logs["accumulated"], logs["large"], strict=True):
        for key in ("loss", "grad_norm", "xkd/distill", "xkd/td_nll"):
            assert accumulated[key] == pytest.approx(large[key], rel=1e-4), (key, accumulated, large)
    weights = {name: load_file(out / "model.safetensors") for name, out in runs.items()}
    start = load_file(Path(tiny_assets["student"]) / "model.safetensors")
    for key, tensor in weights["large"].items():
        torch.testing.assert_close(weights["accumulated"][key], tensor, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(start[k], weights["large"][k]) for k in start)  # the student did train


def test_merge_lora_carries_the_reward_head(tiny_assets, tmp_path):
    """`axolotl merge-lora` on Axolotl >= 0.21 calls the plugin's `post_lora_merge`, which copies the reward head
    into the merged folder; on 0.19 (no such hook) the training log says what to copy where."""
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True,
            "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
            "max_steps": 2, "save_steps": 2}
    out, log = _trained(tiny_assets, tmp_path, lora)
    run_cli(["axolotl", "merge-lora", str(tmp_path / "cfg.yml"), "--lora-model-dir", str(out)])
    merged_dir = out / "merged"
    assert (merged_dir / "model.safetensors").is_file()
    if merge_hook_available():
        head = load_file(merged_dir / WEIGHTS_NAME)
        for key, tensor in load_file(out / WEIGHTS_NAME).items():
            assert torch.equal(head[key], tensor)
        assert json.loads((merged_dir / CONFIG_NAME).read_text()) == json.loads((out / CONFIG_NAME).read_text())
        assert "axolotl merge-lora` will not carry" not in log
    else:
        assert not (merged_dir / WEIGHTS_NAME).exists()
        assert merge_instructions(out) in log


@pytest.mark.skipif(axolotl_version() < Version("0.21"), reason="the `module:Class` plugin form arrived in Axolotl 0.21")
def test_module_colon_class_plugin_line(tiny_assets, tmp_path):
    """Axolotl 0.21 accepts `axolotl_xkd:XKDPlugin` (the entry-point form) beside the dotted one."""
    out, log = _trained(tiny_assets, tmp_path, {"plugins": ["axolotl_xkd:XKDPlugin"], "max_steps": 2,
                                                "save_steps": 2})
    assert "axolotl_xkd 0.1.0 active" in log
    assert (out / WEIGHTS_NAME).is_file()
    assert all("xkd/distill" in e for e in log_history(out) if "loss" in e)
