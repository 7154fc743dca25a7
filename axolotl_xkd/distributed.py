"""Every DeepSpeed/ZeRO helper of axolotl_xkd, in one place: gathering partitioned parameters, the
ZeRO-3 output layer for the chunked loss, and the teacher's DeepSpeed inference engine.

Imports torch at module level and deepspeed only inside the functions that need it (it is optional
and slow to import). Knows nothing of Axolotl, the trainer or the config schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DeepSpeed/DDP engine wrappers (`.module`), e.g. to reach `get_output_embeddings`."""
    while not hasattr(model, "get_output_embeddings") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


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


@contextmanager
def gathered_output_weight(model: nn.Module) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield the output layer's full (V, H) weight and its bias (or None), gathered once under ZeRO-3.

    `model` may be wrapped (DeepSpeed engine, DDP, peft). The yielded tensors are the parameters
    themselves, so gradients reach them; under ZeRO-3 their data is full only inside the block, so a
    loss used here must not need the weight's data in its backward (the chunked loss builds the
    weight's gradient during the forward pass). DeepSpeed's gradient hooks then reduce-scatter the
    full-size gradient like any other.
    """
    layer = unwrap(model).get_output_embeddings()
    bias = getattr(layer, "bias", None)
    with gathered([layer.weight, bias]):
        yield layer.weight, bias
