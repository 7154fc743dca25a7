"""axolotl_xkd.distributed: the teacher's ZeRO-3 inference config, placement errors, and gathering."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from axolotl_xkd.distributed import gathered_output_weight, place_teacher, teacher_inference_config, zero_stage
from tests.support import REPO


def test_teacher_inference_config_has_no_optimizer_and_no_auto():
    train = {
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "offload_optimizer": {"device": "cpu"},
                              "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": True}, "fp16": {"enabled": "auto"}, "optimizer": {"type": "AdamW"},
        "gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": "auto",
    }
    config = teacher_inference_config(train, hidden_size=64, offload=True)
    assert zero_stage(config) == 3 and "optimizer" not in config and "offload_optimizer" not in config["zero_optimization"]
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {}
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 1
    assert "auto" not in repr(config)
    assert "offload_param" not in teacher_inference_config(train, hidden_size=64, offload=False)["zero_optimization"]


def test_offload_without_zero3_names_the_key():
    with pytest.raises(ValueError, match=r"xkd.teacher.offload.*ZeRO stage 2"):
        place_teacher(torch.nn.Linear(2, 2), device="cpu", ds_config={"zero_optimization": {"stage": 2}}, offload=True)


def test_plain_output_layer_passes_through():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Linear(4, 7, bias=False)

        def get_output_embeddings(self):
            return self.out

    model = Tiny()
    with gathered_output_weight(model) as (weight, bias):
        assert weight is model.out.weight and bias is None


def test_gathered_output_weight_under_zero3():
    """Under zero.Init the output layer holds no data on the rank; inside the block it is whole, and a
    gradient built there reaches the parameter."""
    code = """
import os, torch, deepspeed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
from axolotl_xkd.distributed import gathered_output_weight, is_partitioned
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.out = torch.nn.Linear(4, 7)
    def get_output_embeddings(self): return self.out
with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}):
    model = Tiny()
w = model.out.weight
assert is_partitioned(w) and w.numel() == 0, w.shape
with gathered_output_weight(model) as (weight, bias):
    assert weight is w and tuple(weight.shape) == (7, 4) and tuple(bias.shape) == (7,)
    assert weight.abs().sum() > 0
assert w.numel() == 0
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
