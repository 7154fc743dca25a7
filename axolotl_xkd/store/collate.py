"""Collators that keep a precomputed teacher's top-k columns (or a routed row's teacher) through padding and sample
packing.

Rows store the top-k of their response positions only (see store/format.py); these collators expand each
row to (T_row, k) aligned with its tokens (-inf log-probs where there is no teacher entry), pack
rows the way Axolotl's multipack collators do, and pad to the batch's length. The batch gains
`keys.TEACHER_IDS` (B, T, k) int64 and `keys.TEACHER_LOGPROBS` (B, T, k) float32.
Imports Axolotl's collators; nothing of the trainer or the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from axolotl.utils.collators.batching import (
    BatchSamplerDataCollatorForSeq2Seq,
    DataCollatorForSeq2Seq,
    V2BatchSamplerDataCollatorForSeq2Seq,
)

from axolotl_xkd.keys import ROUTE, TEACHER_IDS, TEACHER_LOGPROBS, TOPK_COLUMNS
from axolotl_xkd.store.format import decode, response_mask


def dense_topk(feature: dict, top_k: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """One stored row -> (the row without top-k columns, ids (T, k) int64, log-probs (T, k) float32)."""
    clean = {name: value for name, value in feature.items() if name not in TOPK_COLUMNS}
    labels = np.asarray(feature["labels"])
    mask = response_mask(labels)
    ids = np.zeros((len(labels), top_k), dtype=np.int64)
    logprobs = np.full((len(labels), top_k), -np.inf, dtype=np.float32)
    stored_ids, stored_logprobs = decode({k: feature[k] for k in TOPK_COLUMNS if k in feature}, top_k)
    if len(stored_ids) != int(mask.sum()):
        raise ValueError(
            f"a row with {int(mask.sum())} response positions carries top-k data for {len(stored_ids)}; "
            "the training data was changed after its rows were validated (labels and top-k out of step)."
        )
    ids[mask], logprobs[mask] = stored_ids, stored_logprobs
    clean.setdefault("attention_mask", [1] * len(labels))
    return clean, ids, logprobs


class _TopKMixin:
    """Pops the top-k columns before the base collator runs and adds them back padded."""

    top_k: int
    packed: bool = False

    def __call__(self, features, return_tensors=None):
        packs = features if isinstance(features[0], list) else [[f] for f in features]
        clean_packs, dense = [], []
        for pack in packs:
            rows = [dense_topk(feature, self.top_k) for feature in pack]
            if self.packed:
                for clean, *_ in rows:
                    clean.setdefault("position_ids", list(range(len(clean["input_ids"]))))
            clean_packs.append([row[0] for row in rows])
            dense.append((np.concatenate([row[1] for row in rows]), np.concatenate([row[2] for row in rows])))
        inner = clean_packs if self.packed else [pack[0] for pack in clean_packs]
        batch = super().__call__(inner, return_tensors=return_tensors)
        batch[TEACHER_IDS] = padded([row[0] for row in dense], batch, self.tokenizer, 0, torch.long)
        batch[TEACHER_LOGPROBS] = padded([row[1] for row in dense], batch, self.tokenizer, -torch.inf, torch.float32)
        return batch


def padded(rows: list[np.ndarray], batch: dict, tokenizer, fill: float, dtype: torch.dtype) -> torch.Tensor:
    """Per-row arrays (T_row, ...) as one (B, T, ...) tensor padded with `fill` on the side the base collator padded
    the batch's input_ids (the tokenizer's padding_side)."""
    width = batch["input_ids"].shape[1]
    out = torch.full((len(rows), width, *rows[0].shape[1:]), fill, dtype=dtype)
    left = tokenizer.padding_side == "left"
    for b, row in enumerate(rows):
        out[b, slice(width - len(row), width) if left else slice(0, len(row))] = torch.from_numpy(row)
    return out


@dataclass
class TopKDataCollator(_TopKMixin, DataCollatorForSeq2Seq):
    """Unpacked batches: Axolotl's DataCollatorForSeq2Seq plus the teacher's top-k."""

    top_k: int = 1


@dataclass
class TopKV2BatchSamplerCollator(_TopKMixin, V2BatchSamplerDataCollatorForSeq2Seq):
    """Sample packing (Axolotl's V2 multipack collator) plus the teacher's top-k, per packed segment."""

    top_k: int = 1
    packed: bool = True


@dataclass
class TopKBatchSamplerCollator(_TopKMixin, BatchSamplerDataCollatorForSeq2Seq):
    """Sample packing with Axolotl's V1 multipack collator (flash-attention varlen) plus the top-k."""

    top_k: int = 1
    packed: bool = True


class _RouteMixin:
    """Pops the per-token route column (`keys.ROUTE`) before the base collator runs and adds it back as (B, T)
    int64, packed rows concatenated as the base collator packs them, padding -1 (no teacher)."""

    def __call__(self, features, return_tensors=None):
        packs = features if isinstance(features[0], list) else [[f] for f in features]
        routes = [np.concatenate([np.asarray(f.pop(ROUTE), dtype=np.int64) for f in pack]) for pack in packs]
        batch = super().__call__(features, return_tensors=return_tensors)
        batch[ROUTE] = padded(routes, batch, self.tokenizer, -1, torch.long)
        return batch


@dataclass
class RoutedDataCollator(_RouteMixin, DataCollatorForSeq2Seq):
    """Unpacked batches: Axolotl's DataCollatorForSeq2Seq plus each token's teacher."""


@dataclass
class RoutedV2BatchSamplerCollator(_RouteMixin, V2BatchSamplerDataCollatorForSeq2Seq):
    """Sample packing (Axolotl's V2 multipack collator) plus each token's teacher."""


@dataclass
class RoutedBatchSamplerCollator(_RouteMixin, BatchSamplerDataCollatorForSeq2Seq):
    """Sample packing with Axolotl's V1 multipack collator plus each token's teacher."""


def collator_for(cfg, *, is_eval: bool, top_k: int | None = None) -> tuple[type, dict]:
    """The collator matching the one Axolotl's trainer builder would pick for this config: with a store's top-k
    (`top_k`), or else with the route column."""
    from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES

    unpacked, v2, v1 = ((TopKDataCollator, TopKV2BatchSamplerCollator, TopKBatchSamplerCollator) if top_k is not None
                        else (RoutedDataCollator, RoutedV2BatchSamplerCollator, RoutedBatchSamplerCollator))
    kwargs = {"top_k": top_k} if top_k is not None else {}
    packed = bool(cfg.eval_sample_packing) if is_eval else bool(cfg.sample_packing)
    if not packed:
        return unpacked, kwargs
    use_v2 = (
        cfg.attn_implementation == "flex_attention"
        or cfg.model_config_type in SUPPORTED_MULTIPACK_MODEL_TYPES
        or (cfg.model_config_type == "llama" and cfg.attn_implementation != "flash_attention_2")
    )
    return (v2 if use_v2 else v1), kwargs
