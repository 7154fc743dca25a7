"""A teacher recorded in a store (`source: precomputed` among `xkd.teachers`): each sequence of a batch is looked up
in the store by its tokens and labels, so the store needs neither the training data's order nor its routing, and
weights or routes change without recomputing it.

A single `xkd.teacher` store is the training data instead (store/read.py, the collator expands it); several stores
cannot all be the data, so here the data is Axolotl's and each named store answers for the sequences it recorded.
Imports torch, numpy and the store's reader; nothing of Axolotl or the trainer.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from axolotl_xkd.losses.signal import TopKSignal
from axolotl_xkd.sequences import segments
from axolotl_xkd.teachers.base import TeacherSource

LOG = logging.getLogger("axolotl_xkd")


def sequence_key(input_ids, labels) -> bytes:
    """The lookup key of one sequence: a digest of its token ids and labels (int64)."""
    digest = hashlib.blake2b(np.asarray(input_ids, dtype=np.int64).tobytes(), digest_size=16)
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    return digest.digest()


def check_store_name(path: str, name: str, where: str):
    """The manifest of the store at `path`, refused when it records another teacher than `name` (the item at `where`
    of xkd.teachers); a store written for one teacher records none. Cheap: the plugin calls it before the data."""
    from axolotl_xkd.store.format import MANIFEST, Manifest

    manifest = Manifest.read(path)
    if manifest.teacher_name is not None and manifest.teacher_name != name:
        raise ValueError(f"{Path(path) / MANIFEST}: the store was recorded for the teacher {manifest.teacher_name!r}, "
                         f"but {where} is named {name!r}; point {where}.path at {name!r}'s store, or precompute it "
                         "(`axolotl xkd precompute CONFIG.yml`)")
    return manifest


class RecordedTeacherSource(TeacherSource):
    """The records of a store, placed at the response positions of every batch sequence the store holds."""

    def __init__(self, splits: list, *, top_k: int, where: str, partial: bool = False) -> None:
        self.splits = splits  # datasets.Dataset per split, rows as the store wrote them
        self.top_k = top_k
        self.where = where
        # A store of routed teacher generations holds only its teacher's rows; a packed row it is asked about may hold
        # other teachers' sequences, which get no entry here (the route gives them weight 0 for this teacher).
        self.partial = partial
        self.index: dict[bytes, tuple[int, int]] = {}
        for s, split in enumerate(splits):
            table = split.data
            for r, (ids, labels) in enumerate(zip(table.column("input_ids").to_pylist(),
                                                  table.column("labels").to_pylist())):
                self.index.setdefault(sequence_key(ids, labels), (s, r))

    @classmethod
    def open(cls, block, *, name: str, where: str, tokenizer, sequence_len: int, sequences: str = "dataset",
             partial: bool = False) -> RecordedTeacherSource:
        """The store of the named teacher `block` (found at `where` in the config), checked as a single store is
        (tokenizer, sequence_len, k, `sequences`, the teacher pair across tokenizers) and refused when recorded for
        another name; `partial`: it holds only the sequences routed to its teacher (routed teacher generations)."""
        from axolotl_xkd.store.read import check_manifest, check_teacher_pair, load_split

        manifest = check_store_name(block.path, name, where)
        check_manifest(manifest, block.path, tokenizer=tokenizer, sequence_len=sequence_len, top_k=block.top_k,
                       sequences=sequences)
        check_teacher_pair(manifest, block, tokenizer)
        splits = [load_split(block.path, manifest, split) for split, rows in manifest.splits.items() if rows]
        LOG.info("X-KD teacher %r: store %s (k=%d, %s rows)", name, block.path, manifest.top_k, manifest.splits)
        return cls(splits, top_k=manifest.top_k, where=f"{where}.path={block.path!r}", partial=partial)

    def get_signal(self, batch: dict[str, Tensor]) -> TopKSignal:
        """TopKSignal (B, T, k): each sequence's stored records at its response positions, -inf elsewhere."""
        from axolotl_xkd.store.collate import dense_topk
        from axolotl_xkd.store.format import response_mask

        input_ids = batch["input_ids"].cpu().numpy()
        labels = batch["labels"].cpu().numpy()
        shape = (*input_ids.shape, self.top_k)
        ids = torch.zeros(shape, dtype=torch.long)
        logprobs = torch.full(shape, -torch.inf, dtype=torch.float32)
        for b, start, end in segments(batch):
            mask = response_mask(labels[b, start:end])
            if not mask.any():
                continue
            found = self.index.get(sequence_key(input_ids[b, start:end], labels[b, start:end]))
            if found is None and self.partial:
                continue
            if found is None:
                raise KeyError(f"{self.where}: batch row {b} (tokens {start}..{end - 1}) is not in the store: it was "
                               "recorded for other training data (another dataset, tokenizer settings or "
                               "sequence_len). Precompute the store again with this config.")
            _, row_ids, row_logprobs = dense_topk(self.splits[found[0]][found[1]], self.top_k)  # as the collator
            ids[b, start:end] = torch.from_numpy(row_ids)
            logprobs[b, start:end] = torch.from_numpy(row_logprobs)
        device = batch["input_ids"].device
        return TopKSignal(token_ids=ids.to(device), logprobs=logprobs.to(device))
