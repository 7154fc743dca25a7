"""End to end: `axolotl train` with `bf16: true` on a machine without an accelerator (the plugin sets `use_cpu`), with
each teacher source: an in-process bf16 teacher beside the float32 output layer Axolotl keeps for a full fine-tune, a
LoRA student (bf16 output layer) against a float32 server teacher, and a precomputed store (docs/precision.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from axolotl.integrations.base import BasePlugin
from safetensors import safe_open

from tests.e2e.test_lora import LORA
from tests.support import (
    REPO,
    base_config,
    log_history,
    merged,
    precompute_args,
    run_cli,
    serve_teacher,
    train,
    with_first_rows,
    write_config,
)
from tests.unit.test_precision import GRAD_RTOL, LOSS_RTOL

pytestmark = pytest.mark.e2e

PROBE = "tests.e2e.test_precision.DtypeProbe"
BF16 = {"plugins": ["axolotl_xkd.XKDPlugin", PROBE], "bf16": True, "max_steps": 2, "save_steps": 2}


class DtypeProbe(BasePlugin):
    """Test-only plugin: writes what the trainer was built with (use_cpu, the output layer's and the teacher's
    dtypes) to dtypes.json in the output directory."""

    def post_trainer_create(self, cfg, trainer) -> None:
        from axolotl_xkd.trainer import base_model

        student = base_model(trainer.accelerator.unwrap_model(trainer.model))
        teacher = getattr(trainer.xkd.teacher, "model", None)
        record = {"use_cpu": trainer.args.use_cpu, "bf16": trainer.args.bf16,
                  "output_layer": str(student.get_output_embeddings().weight.dtype),
                  "teacher": None if teacher is None else str(next(teacher.parameters()).dtype)}
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "dtypes.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory) -> dict[str, dict]:
    """Five short bf16 runs on 64 rows: the in-process teacher with two micro-batches of 4 and with one of 8, a
    LoRA student against `axolotl xkd serve-teacher`, and a precomputed store. Name -> output dir, stdout, dtypes."""
    tmp = tmp_path_factory.mktemp("bf16")
    assets = with_first_rows(tiny_assets, tmp / "data", 64)
    env = {"PYTHONPATH": str(REPO)}
    model_teacher = {"xkd": {"teacher": {"dtype": "bfloat16"}}}
    configs = {
        "accumulated": merged(BF16, {**model_teacher, "micro_batch_size": 4, "gradient_accumulation_steps": 2}),
        "one_batch": merged(BF16, {**model_teacher, "micro_batch_size": 8, "gradient_accumulation_steps": 1}),
        "store": merged(BF16, {"xkd": {"divergence": "jsd", "teacher": {
            "source": "precomputed", "path": str(tmp / "topk"), "top_k": 8}}}),
    }
    write_config(tmp / "precompute.yml", base_config(assets, tmp / "precompute"))
    run_cli(["axolotl", *precompute_args(tmp / "precompute.yml", tmp / "topk", rows_per_shard=64)])
    done = {}
    with serve_teacher(assets["teacher"]) as url:
        configs["lora_server"] = merged(merged(BF16, LORA), {
            "plugins": BF16["plugins"], "max_steps": 2, "save_steps": 2,
            "xkd": {"divergence": "reverse_kl", "teacher": {"source": "server", "path": None, "base_url": url, "top_k": 8}}})
        for name in ("lora_server", "accumulated", "one_batch", "store"):
            config = merged(base_config(assets, tmp / name), configs[name])
            proc = train(write_config(tmp / name / "config.yml", config), env=env)
            out = Path(config["output_dir"])
            done[name] = {"out": out, "stdout": proc.stdout + proc.stderr,
                          "dtypes": json.loads((out / "dtypes.json").read_text())}
    return done


def test_bf16_trains_on_the_cpu_with_finite_losses(runs):
    """Every run trained with bf16 on the CPU (use_cpu set by the plugin, said once in the log) and logged finite
    losses and non-negative divergences at every step."""
    for name, run in runs.items():
        assert run["dtypes"]["use_cpu"] and run["dtypes"]["bf16"], name
        assert "training on the CPU (TrainingArguments.use_cpu)" in run["stdout"], name
        steps = [entry for entry in log_history(run["out"]) if "loss" in entry]
        assert len(steps) == 2, name
        for entry in steps:
            assert math.isfinite(entry["loss"]) and entry["xkd/distill"] >= 0.0, (name, entry)


def test_teacher_and_student_dtypes_cross(runs):
    """A bf16 teacher beside a float32 output layer (Axolotl keeps embeddings and the output layer in float32 for a
    full fine-tune with sdpa), and a bf16 LoRA output layer beside a float32 server teacher."""
    assert runs["accumulated"]["dtypes"]["teacher"] == "torch.bfloat16"
    assert runs["accumulated"]["dtypes"]["output_layer"] == "torch.float32"
    assert runs["lora_server"]["dtypes"]["output_layer"] == "torch.bfloat16"


def test_saved_bf16_student_loads(runs):
    """The full fine-tune's student is saved with its bf16 layers in bf16 (Axolotl keeps embeddings, norms and the
    output layer in float32) and loads with plain transformers: as saved, exactly, in the config's float32 (the
    default) and, its bf16 layers bit for bit, with dtype=torch.bfloat16; its logits are finite."""
    from transformers import AutoModelForCausalLM

    out = runs["accumulated"]["out"]
    with safe_open(out / "model.safetensors", "pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}
    bf16 = [key for key, value in saved.items() if value.dtype == torch.bfloat16]
    assert any("mlp" in key for key in bf16)
    for dtype, keys in ((None, list(saved)), (torch.bfloat16, bf16)):
        model = AutoModelForCausalLM.from_pretrained(out, **({} if dtype is None else {"dtype": dtype}))
        state = model.state_dict()
        for key in keys:
            assert torch.equal(state[key], saved[key].to(state[key].dtype)), key
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
        assert logits.dtype == (dtype or torch.float32) and torch.isfinite(logits).all()


def test_gradient_accumulation_equals_one_micro_batch(runs):
    """Two bf16 micro-batches of 4 against one of 8 (the same 8 rows per step): the first step's gradient norm (same
    weights) within the documented gradient bound, and every step's loss within the loss bound."""
    accumulated, one_batch = ([e for e in log_history(runs[name]["out"]) if "loss" in e]
                              for name in ("accumulated", "one_batch"))
    assert accumulated[0]["grad_norm"] == pytest.approx(one_batch[0]["grad_norm"], rel=GRAD_RTOL)
    for a, b in zip(accumulated, one_batch, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
