"""End to end: a LoRA student (peft). The reward head trains alongside the adapter and is saved beside
it; merging the adapter gives the same student. QLoRA (bitsandbytes, CUDA only) is checked to validate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support import REPO, base_config, merged, train, write_config

pytestmark = pytest.mark.e2e

LORA = {
    "plugins": ["axolotl_xkd.XKDPlugin", "tests.e2e.probe.ProbePlugin"],
    "adapter": "lora",
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
    # Axolotl's fused LoRA kernels are Triton (CUDA only); the CPU run uses peft's plain layers.
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "max_steps": 2,
    "save_steps": 2,
}


@pytest.fixture(scope="module")
def lora_run(tiny_assets, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("lora")
    config = merged(base_config(tiny_assets, tmp), LORA)
    train(write_config(tmp / "cfg.yml", config), env={"PYTHONPATH": str(REPO)})
    return {"config": config, "out": Path(config["output_dir"])}


def test_reward_head_trains_alongside_the_adapter(lora_run):
    import json

    (probe,) = [json.loads(p.read_text()) for p in lora_run["out"].glob("probe_rank*.json")]
    assert probe["head_requires_grad"] and probe["head_optimized"]
    trainable = probe["trainable_names"]
    assert any("lora_A" in n for n in trainable) and any("xkd_reward_head" in n for n in trainable)
    assert all("lora_" in n or "xkd_reward_head" in n for n in trainable), trainable
    head = load_file(lora_run["out"] / "xkd_reward_head.safetensors")
    assert head["proj.weight"].abs().sum() > 0  # initialised at zero, so it moved


def test_head_saved_beside_the_adapter(lora_run):
    out = lora_run["out"]
    for folder in (out, out / "checkpoint-2"):
        assert (folder / "adapter_model.safetensors").is_file() and (folder / "xkd_reward_head.safetensors").is_file()
        with safe_open(folder / "adapter_model.safetensors", "pt") as f:
            keys = list(f.keys())
        assert keys and not [k for k in keys if "xkd" in k], keys


def test_merged_adapter_gives_the_same_student(lora_run, tiny_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 14, 20, 7, 3, 11]])
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["student"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, lora_run["out"]).eval()
    with torch.no_grad():
        expected = adapted(ids).logits
        merged_model = adapted.merge_and_unload()
        merged_model.save_pretrained(tmp_path / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        got = reloaded(ids).logits
    assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(tiny_assets["student"])(ids).logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_example_lora_config_validates(adapter):
    """example_configs/xkd_llama_lora.yml validates, and so does its QLoRA variant (which trains on CUDA only:
    bitsandbytes 4-bit)."""
    code = (
        "import yaml\n"
        "from axolotl.cli.config import prepare_plugins\n"
        "from axolotl.utils.config import validate_config\n"
        "from axolotl.utils.dict import DictDefault\n"
        "raw = yaml.safe_load(open('example_configs/xkd_llama_lora.yml'))\n"
        f"if {adapter!r} == 'qlora': raw.update(adapter='qlora', load_in_4bit=True, load_in_8bit=False)\n"
        "cfg = DictDefault(raw)\n"
        "prepare_plugins(cfg)\n"
        "cfg = validate_config(cfg)\n"
        f"assert cfg.adapter == {adapter!r} and cfg.xkd['teacher']['source'] == 'model'\n"
        "print('valid')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "valid" in proc.stdout, proc.stderr[-3000:]
