"""A test-only Axolotl plugin that records, per rank, what a distributed X-KD run really did.

Listed after axolotl_xkd.XKDPlugin in a test config's `plugins:`, it observes the real trainer (it
changes nothing) and writes `probe_rank{R}.json` into the output directory at the end of training:
the world size, a hash of every batch the student's forward received on this rank (and the first
batches' input_ids, -1 at padding), how accelerate counted and wrapped the ranks, DeepSpeed's
partition state of the student, the optimizer and the teacher, whether the reward head is
trainable and optimised, and a hash of the final replicated parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from axolotl_xkd.distributed import is_partitioned
from axolotl_xkd.wiring import find_reward_head

FIRST_INPUTS = 4


def _numel(params) -> tuple[int, int]:
    """(total elements, elements this rank holds) over `params`; ZeRO-3 shards count their own size."""
    total = local = 0
    for p in params:
        if is_partitioned(p):
            total += p.ds_numel
            local += p.ds_tensor.numel()
        else:
            total += p.numel()
            local += p.numel()
    return total, local


def _replicated_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter this rank holds whole (all of them unless ZeRO-3 partitions them): data
    parallel ranks whose gradients were synchronised end with equal digests."""
    digest = hashlib.sha1()
    for name, p in sorted(model.named_parameters()):
        if not is_partitioned(p):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _optimized_ids(trainer) -> set[int]:
    """ids of the module parameters the optimizer updates (DeepSpeed's ZeRO optimizers keep them in groups)."""
    engine = getattr(trainer, "deepspeed", None)
    if engine is not None:
        groups = getattr(engine.optimizer, "fp16_groups", None) or getattr(engine.optimizer, "bit16_groups", None)
        return {id(p) for group in groups for p in group}
    return {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}


class _Recorder(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.batches: list[str] = []
        self.first_inputs: list[list[list[int]]] = []  # input_ids of the first FIRST_INPUTS training forwards
        self.state: dict = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.state:
            return
        trainer = self.trainer
        engine = getattr(trainer, "deepspeed", None)
        student = trainer.model
        head = find_reward_head(student)
        optimized = _optimized_ids(trainer)
        total, local = _numel(student.parameters())
        self.state = {
            "zero_stage": engine.zero_optimization_stage() if engine is not None else None,
            "student_numel": total,
            "student_local_numel": local,
            "head_requires_grad": all(p.requires_grad for p in head.parameters()),
            "head_optimized": all(id(p) in optimized for p in head.parameters()),
            "trainable_names": [n for n, p in student.named_parameters() if p.requires_grad],
            "accelerator_processes": trainer.accelerator.num_processes,
            "wrapper": type(trainer.model_wrapped).__name__,
            "fused_loss": trainer._uses_fused_loss(trainer.model_wrapped),
        }
        if engine is not None and self.state["zero_stage"] in (1, 2):
            # ZeRO-1/2: each rank holds the fp32 master weights and optimizer state of its partition only.
            partitions = engine.optimizer.single_partition_of_fp32_groups
            self.state["optimizer_partition_numel"] = sum(p.numel() for p in partitions)
            self.state["partition_count"] = list(engine.optimizer.partition_count)
        teacher = trainer.xkd.teacher
        if teacher is not None and hasattr(teacher, "engine"):
            t_total, t_local = _numel(teacher.model.parameters())
            self.state["teacher"] = {
                "engine": type(teacher.engine).__name__ if teacher.engine is not None else None,
                # Without an optimizer, a ZeRO-3 engine holds a DeepSpeedZeRoOffload (partitioning only, no state).
                "optimizer": type(teacher.engine.optimizer).__name__ if teacher.engine is not None else None,
                "numel": t_total,
                "local_numel": t_local,
                "requires_grad": any(p.requires_grad for p in teacher.model.parameters()),
                "fusable": teacher.fusable,
            }

    def on_train_end(self, args, state, control, **kwargs):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        record = {"rank": rank, "world_size": world, "node_rank": os.environ.get("GROUP_RANK"),
                  "batches": self.batches, "first_inputs": self.first_inputs,
                  "replicated_digest": _replicated_digest(self.trainer.model), **self.state}
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"probe_rank{rank}.json").write_text(json.dumps(record, indent=1))


class ProbePlugin(BasePlugin):
    """Records the run's distributed state for the e2e tests; see the module docstring."""

    def post_trainer_create(self, cfg, trainer) -> None:
        recorder = _Recorder(trainer)

        def record_batch(_module, _args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None and torch.is_grad_enabled():
                recorder.batches.append(hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()[:16])
                if len(recorder.first_inputs) < FIRST_INPUTS:
                    mask = kwargs.get("attention_mask")
                    recorder.first_inputs.append((ids if mask is None else ids.masked_fill(mask == 0, -1)).tolist())

        trainer.model.register_forward_pre_hook(record_batch, with_kwargs=True)
        trainer.add_callback(recorder)
