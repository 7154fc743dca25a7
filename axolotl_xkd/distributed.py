"""Every DeepSpeed/ZeRO and multi-process helper of axolotl_xkd, in one place: the fix that lets several ranks run
on CPUs only (before the model loads, then once the trainer exists), gathering partitioned parameters, the ZeRO-3
output layer for the chunked loss, and the teacher's DeepSpeed inference engine.

Imports torch at module level and deepspeed only inside the functions that need it (it is optional
and slow to import). Knows nothing of Axolotl, the trainer or the config schema.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DeepSpeed/DDP engine wrappers (`.module`), e.g. to reach `get_output_embeddings`."""
    while not hasattr(model, "get_output_embeddings") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def cpu_ranks_before_model_load(cfg) -> None:
    """Make a multi-process run on a machine without an accelerator work as it does on GPUs.

    Axolotl 0.19's `normalize_config` sets `device_map: {"": LOCAL_RANK}` for any world size above 1,
    which transformers reads as an accelerator index ("Cannot access accelerator device"), so DDP and
    ZeRO-1/2 cannot start; the model loader has already put that same dict object into its
    `from_pretrained` kwargs when this hook runs, so it is rewritten in place. Without DeepSpeed,
    accelerate also needs ACCELERATE_USE_CPU to set up gloo DDP, or each rank trains alone;
    DeepSpeed's own count is mended by `cpu_ranks_after_trainer_create` once the trainer exists.
    """
    if cfg.get("world_size", 1) <= 1 or cfg.get("device") != "cpu":
        return
    device_map = cfg.get("device_map")
    if isinstance(device_map, dict):
        for key, value in device_map.items():
            if isinstance(value, int):
                device_map[key] = "cpu"
    if not cfg.get("deepspeed") and not cfg.get("fsdp_config"):
        os.environ["ACCELERATE_USE_CPU"] = "true"


def cpu_ranks_after_trainer_create(accelerator) -> None:
    """Make accelerate count every rank of a DeepSpeed run on CPUs only, so each rank gets its own data.

    accelerate 1.x picks no backend for a DeepSpeed launch without an accelerator (its CPU branch needs
    `cpu=True`, which also switches DeepSpeed off), so it reports one process although DeepSpeed has
    started torch.distributed (gloo) over all of them: every rank then iterates the whole data set and
    token counts are not summed across ranks. Sets the count and indices from torch.distributed; does
    nothing on accelerators or when the count is already right. Call before the first dataloader.
    """
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    if (not torch.distributed.is_initialized() or accelerator.device.type != "cpu"
            or accelerator.distributed_type != DistributedType.DEEPSPEED):
        return
    world = torch.distributed.get_world_size()
    if accelerator.num_processes == world:
        return
    ranks = {"num_processes": world, "process_index": torch.distributed.get_rank(),
             "local_process_index": int(os.environ.get("LOCAL_RANK", 0))}
    # Both states keep class-level shared dicts; AcceleratorState copied PartialState's when it was made.
    PartialState._shared_state.update(ranks)
    AcceleratorState._shared_state.update(ranks)


def is_partitioned(param: Tensor) -> bool:
    """True for a parameter ZeRO-3 (or `zero.Init`) manages; its `.data` is then a shard or empty."""
    return hasattr(param, "ds_id")


@contextmanager
def gathered(params: Iterable[Tensor | None], *, modifier_rank: int | None = None) -> Iterator[None]:
    """Within the block, every ZeRO-3-partitioned parameter in `params` holds its full data on every rank.

    The one place that opens `deepspeed.zero.GatheredParameters` (TRL has five copies of it). Parameters
    that are not partitioned (no DeepSpeed, ZeRO-1/2) and `None` entries pass through untouched, so
    callers need no ZeRO branch. With `modifier_rank=r`, changes rank r makes are broadcast on exit.
    """
    partitioned = [p for p in params if p is not None and is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def through_output_layer(model: nn.Module, loss_fn: Callable[[Tensor, Tensor | None, Tensor], T],
                         hidden: Tensor) -> T:
    """`loss_fn(weight, bias, hidden)` on the output layer's full (V, H) weight and its bias (or None).

    `model` may be wrapped (DeepSpeed engine, DDP, peft). Under ZeRO-3 the call runs as the output
    layer's own forward, so DeepSpeed's module hooks gather the weight once for it and once again when
    the backward pass reaches it, as for any layer: the weight gradient the chunked loss built in its
    forward is then accumulated into a whole parameter and reduce-scattered like any other. Outputs
    must be tensors or (named) tuples of them, which DeepSpeed's hooks can follow.
    """
    layer = unwrap(model).get_output_embeddings()
    bias = getattr(layer, "bias", None)
    if not is_partitioned(layer.weight):
        return loss_fn(layer.weight, bias, hidden)
    layer.forward = lambda h: loss_fn(layer.weight, bias, h)  # the instance attribute shadows Linear.forward
    try:
        return layer(hidden)
    finally:
        del layer.forward


def full_shape(param: Tensor) -> tuple[int, ...]:
    """The parameter's whole shape, also when ZeRO-3 holds only a shard of it on this rank."""
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def zero_stage(ds_config: dict | None) -> int:
    """The ZeRO stage of a DeepSpeed config dict (0 without DeepSpeed or without `zero_optimization`)."""
    return int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0))


def _without_auto(config: dict) -> dict:
    """`config` without its unresolved "auto" values: the teacher's engine gets no optimizer to resolve them."""
    return {
        k: _without_auto(v) if isinstance(v, dict) else v
        for k, v in config.items()
        if not (isinstance(v, str) and v == "auto")
    }


def teacher_inference_config(train_config: dict, *, hidden_size: int, offload: bool) -> dict:
    """A ZeRO-3 inference config for the frozen teacher, derived from the student's training config.

    No optimizer, scheduler or gradient settings (the teacher has no optimizer state); the same
    precision and micro batch size as the student; bucket sizes from the teacher's hidden size as
    TRL's `prepare_deepspeed` sets them; `offload=True` keeps the parameter shards in CPU memory.
    """
    zero = _without_auto(dict(train_config.get("zero_optimization") or {}))
    for key in ("offload_optimizer", "offload_param", "stage3_gather_16bit_weights_on_model_save"):
        zero.pop(key, None)
    zero.update(
        stage=3,
        reduce_bucket_size=hidden_size * hidden_size,
        stage3_param_persistence_threshold=10 * hidden_size,
        stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
    )
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    for key in ("bf16", "fp16", "train_micro_batch_size_per_gpu"):
        value = train_config.get(key)
        if isinstance(value, dict):
            config[key] = _without_auto(value)
        elif value is not None and value != "auto":
            config[key] = value
    return config


def place_teacher(model: nn.Module, *, device, ds_config: dict | None, offload: bool = False) -> nn.Module:
    """Put the frozen teacher where each rank runs it; returns the module to call.

    Under ZeRO-3 (`ds_config` stage 3) the teacher becomes a DeepSpeed stage-3 inference engine:
    its parameters are sharded across ranks and gathered layer by layer in its forward, with no
    optimizer (TRL's `prepare_deepspeed`). Otherwise (no DeepSpeed, ZeRO-1/2) the whole teacher is
    moved once to this rank's device. `offload` (ZeRO-3 only) keeps the shards in CPU memory.
    """
    if zero_stage(ds_config) != 3:
        if offload:
            raise ValueError(
                "xkd.teacher.offload: true needs DeepSpeed ZeRO-3 (the teacher is sharded and offloaded by its "
                f"stage-3 inference engine), but the run uses ZeRO stage {zero_stage(ds_config)}; set "
                "`deepspeed:` to a stage-3 JSON such as example_configs/deepspeed/zero3.json, or remove offload."
            )
        return model.to(device)
    import deepspeed

    hidden_size = model.config.get_text_config().hidden_size
    config = teacher_inference_config(ds_config, hidden_size=hidden_size, offload=offload)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
