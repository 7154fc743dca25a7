"""axolotl_xkd.distributed: the teacher's ZeRO-3 inference config, placement errors, and gathering."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from axolotl_xkd.distributed import place_teacher, teacher_inference_config, through_output_layer, zero_stage
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
    hidden = torch.randn(3, 4)
    got = through_output_layer(model, lambda weight, bias, h: (weight, bias, h), hidden)
    assert got[0] is model.out.weight and got[1] is None and got[2] is hidden


@pytest.mark.e2e  # a DeepSpeed process group in a subprocess, on a fixed port
def test_through_output_layer_under_zero3_delivers_a_gradient_built_in_the_forward():
    """Under ZeRO-3 (one process, gloo) the output layer's weight is a shard; a loss that builds the weight's
    gradient in its forward pass, as the chunked loss does, runs through the layer and its gradient reaches
    DeepSpeed whole: it equals the gradient of the same loss on an unpartitioned copy."""
    code = """
import copy, os, torch, deepspeed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
from deepspeed.utils import safe_get_full_grad
from axolotl_xkd.distributed import is_partitioned, through_output_layer

class GradInForward(torch.autograd.Function):
    # loss = sum((h W^T + b)^2); both gradients formed in the forward, as the chunked loss forms them.
    @staticmethod
    def forward(ctx, h, w, b):
        z = h @ w.T + b
        ctx.save_for_backward(2 * z @ w, 2 * z.T @ h, 2 * z.sum(0))
        return z.square().sum()
    @staticmethod
    def backward(ctx, g):
        return tuple(g * t for t in ctx.saved_tensors)

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.inner = torch.nn.Linear(4, 4); self.out = torch.nn.Linear(4, 300)
    def get_output_embeddings(self): return self.out

torch.manual_seed(0)
reference = Tiny()
config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
engine, *_ = deepspeed.initialize(model=copy.deepcopy(reference), config=config)
assert is_partitioned(engine.module.out.weight)
x = torch.randn(5, 4)
loss = through_output_layer(engine, lambda w, b, h: GradInForward.apply(h, w, b), engine.module.inner(x))
engine.backward(loss)
expected = GradInForward.apply(reference.inner(x), reference.out.weight, reference.out.bias)
expected.backward()
torch.testing.assert_close(loss, expected)
for name in ("out.weight", "out.bias", "inner.weight"):
    got = safe_get_full_grad(engine.module.get_parameter(name))
    torch.testing.assert_close(got, reference.get_parameter(name).grad)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
