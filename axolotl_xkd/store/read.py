"""Reading a precomputed teacher: a store's splits, checked against the training config through its manifest, or
a tokenized dataset in Axolotl's KD v2 format; every row validated. Hands Axolotl its TrainDatasetMeta through
the plugin's `load_datasets` hook.

Imports datasets, and Axolotl's data utilities inside the functions that need them (the plugin imports this
module lazily); nothing of the trainer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from axolotl_xkd.args import PrecomputedTeacher
from axolotl_xkd.frozen_teacher import special_tokens, tokenizer_hash, warn_other_special_tokens
from axolotl_xkd.keys import TOPK_IDS, TOPK_LOGPROBS
from axolotl_xkd.losses.positions import IGNORE_INDEX
from axolotl_xkd.store.format import (
    MANIFEST,
    Manifest,
    RowError,
    check_shard,
    missing_shards,
    response_mask,
    shard_dir,
    validate_rows,
)

LOG = logging.getLogger("axolotl_xkd")
KD_V2_IDS, KD_V2_LOGPROBS = "target_token_ids", "logprobs"


def check_manifest(manifest: Manifest, folder: str, *, tokenizer, sequence_len: int, top_k: int | None,
                   sequences: str = "dataset") -> None:
    """Refuse a store made for another tokenizer, sequence_len, k or kind of sequences; the error names the file
    and field."""
    where = Path(folder) / MANIFEST
    if manifest.sequences != sequences:
        how = "with" if sequences == "teacher" else "without"
        raise ValueError(
            f"{where}: sequences {manifest.sequences!r} differs from xkd.sequences {sequences!r}; set xkd.sequences: "
            f"{manifest.sequences}, or precompute again {how} --generate."
        )
    expected = tokenizer_hash(tokenizer)
    if manifest.tokenizer_hash != expected:
        raise ValueError(
            f"{where}: tokenizer_hash {manifest.tokenizer_hash[:12]}... differs from the training tokenizer's "
            f"{expected[:12]}... (tokenizer_config / base_model): the stored token ids would mean other tokens. "
            "Precompute again with this config's tokenizer."
        )
    if manifest.vocab_size != len(tokenizer):
        raise ValueError(f"{where}: vocab_size {manifest.vocab_size} differs from the tokenizer's {len(tokenizer)}.")
    warn_other_special_tokens(special_tokens(tokenizer), manifest.special_tokens or {}, str(where))
    if manifest.sequence_len != sequence_len:
        raise ValueError(
            f"{where}: sequence_len {manifest.sequence_len} differs from the config's sequence_len {sequence_len}; "
            "rows were tokenized and filtered for another length. Precompute again with this config."
        )
    if top_k is not None and manifest.top_k != top_k:
        raise ValueError(
            f"{where}: top_k {manifest.top_k} differs from xkd.teacher.top_k {top_k}; set xkd.teacher.top_k: "
            f"{manifest.top_k} (or leave it out), or precompute again with --top-k {top_k}."
        )


def check_teacher_pair(manifest: Manifest, config: PrecomputedTeacher, tokenizer) -> None:
    """A store aligned from a teacher of another tokenizer (manifest.vocab_map) and a config that names the
    teacher (xkd.teacher.model_path): refuse it unless it was built for this (student, teacher) pair. A store and a
    config that disagree on whether the teacher has another tokenizer (xkd.teacher.cross_tokenizer) are refused."""
    where = Path(config.path) / MANIFEST
    if (manifest.vocab_map is not None) != config.cross_tokenizer:
        made = "aligned from a teacher of another tokenizer" if manifest.vocab_map else "made with the student's tokenizer"
        raise ValueError(
            f"{where}: the store was {made}, but the config has xkd.teacher.cross_tokenizer: "
            f"{str(config.cross_tokenizer).lower()}. Set cross_tokenizer: {str(manifest.vocab_map is not None).lower()} "
            "if this is the teacher you meant, or precompute again (`axolotl xkd precompute CONFIG.yml`, which reads "
            "the key) for this config's teacher."
        )
    if manifest.vocab_map is None or config.model_path is None:
        return
    from transformers import AutoTokenizer

    from axolotl_xkd.cross_tokenizer import VocabMap

    teacher = AutoTokenizer.from_pretrained(config.model_path)
    same_teacher = manifest.teacher_tokenizer_hash == tokenizer_hash(teacher)
    if not same_teacher or manifest.vocab_map != VocabMap.of(tokenizer, teacher, str(where)).digest():
        raise ValueError(
            f"{where}: teacher_tokenizer_hash / vocab_map were made for another (student, teacher) pair than this "
            f"config's tokenizer and xkd.teacher.model_path={config.model_path!r}, or by an earlier alignment rule; "
            "its stored records would pair other tokens. Precompute again (`axolotl xkd precompute CONFIG.yml`) for "
            "this pair."
        )


def _read_any(path: str):
    """A `datasets.Dataset` from a save_to_disk folder or a .jsonl/.json/.parquet file."""
    from datasets import load_dataset, load_from_disk

    if Path(path).is_dir():
        return load_from_disk(path)
    suffix = Path(path).suffix.lstrip(".")
    kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "arrow": "arrow"}.get(suffix)
    if kind is None:
        raise ValueError(f"xkd.teacher.path={path!r}: expected a folder saved with save_to_disk or a "
                         ".jsonl/.json/.parquet/.arrow file")
    return load_dataset(kind, data_files=path, split="train")


def from_axolotl_kd_v2(dataset, *, path: str, top_k: int | None):
    """Axolotl KD v2 rows -> this plugin's row format (split encoding, float32 log-probs).

    Alignment: Axolotl's KD loss pairs `target_token_ids[i]` / `logprobs[i]` with the student's logits
    at position i (topk_logprob/forward_kl.py slices student_logits[:, :T] with no shift), so entry i
    is the teacher's distribution over u_{i+1}: the same convention as this plugin's store. Axolotl
    masks them with labels[i] (its chat_template.py), one position off from that pairing; here the
    mask is labels[i+1] like the student's loss. Lists shorter than input_ids are refused: Axolotl
    left-pads them, which shifts them by the missing count.
    """
    for name in ("input_ids", "labels", KD_V2_IDS, KD_V2_LOGPROBS):
        if name not in dataset.column_names:
            raise ValueError(f"xkd.teacher.path={path!r} (format axolotl_kd_v2) has no column {name!r}; "
                             f"found {dataset.column_names}")
    k = top_k
    out = {"input_ids": [], "labels": [], TOPK_IDS: [], TOPK_LOGPROBS: []}
    for r, row in enumerate(dataset):
        labels = np.asarray(row["labels"])
        n = len(row["input_ids"])
        for name in (KD_V2_IDS, KD_V2_LOGPROBS):
            if len(row[name]) != n:
                raise RowError(
                    f"{path}: row {r}, field {name!r}: {len(row[name])} positions for {n} input_ids. Entry i must "
                    "be the teacher's distribution over token i+1 for every position i (Axolotl would left-pad a "
                    "shorter list, shifting it); regenerate the logprobs for the full row."
                )
        positions = np.flatnonzero(response_mask(labels))
        ids, logprobs = [], []
        for i in positions:
            pos_ids, pos_lps = row[KD_V2_IDS][i] or [], row[KD_V2_LOGPROBS][i] or []
            k = k or len(pos_ids)
            if len(pos_ids) != k or len(pos_lps) != k:
                raise RowError(f"{path}: row {r}, field {KD_V2_IDS!r}/{KD_V2_LOGPROBS!r}: position {i} has "
                               f"{len(pos_ids)} ids and {len(pos_lps)} log-probs, expected k={k}.")
            ids.extend(pos_ids)
            logprobs.extend(float("nan") if v is None else v for v in pos_lps)
        out["input_ids"].append(row["input_ids"])
        out["labels"].append([int(v) for v in labels])
        out[TOPK_IDS].append(ids)
        out[TOPK_LOGPROBS].append(logprobs)
    if k is None:
        raise ValueError(f"xkd.teacher.path={path!r}: no row has a response position (labels != {IGNORE_INDEX}).")
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        (TOPK_IDS, pa.list_(pa.int64())), (TOPK_LOGPROBS, pa.list_(pa.float32()))])
    return pa.Table.from_pydict(out, schema=schema), k


def store_top_k(config: PrecomputedTeacher) -> int:
    """k of the configured data (manifest for a store; config or first rows for KD v2)."""
    if config.format == "xkd":
        return Manifest.read(config.path).top_k
    if config.top_k is not None:
        return config.top_k
    dataset = _read_any(config.path)
    for row in dataset:
        for i in np.flatnonzero(response_mask(row["labels"])):
            if row[KD_V2_IDS][i]:
                return len(row[KD_V2_IDS][i])
    raise ValueError(f"xkd.teacher.path={config.path!r}: no response position carries target_token_ids")


def load_precomputed(cfg, config: PrecomputedTeacher, tokenizer, *, sequences: str = "dataset"):
    """(train, eval or None, k): the validated training rows of a precomputed teacher."""
    from datasets import Dataset

    if config.format == "axolotl_kd_v2":
        table, k = from_axolotl_kd_v2(_read_any(config.path), path=config.path, top_k=config.top_k)
        validate_rows(table, top_k=k, vocab_size=len(tokenizer), where=config.path)
        too_long = np.flatnonzero(np.asarray([len(x) for x in table.column("input_ids").to_pylist()])
                                  > cfg.sequence_len)
        if too_long.size:
            raise RowError(f"{config.path}: row {int(too_long[0])}, field 'input_ids': longer than sequence_len "
                           f"{cfg.sequence_len}; truncate the rows or raise sequence_len.")
        LOG.warning("xkd: %s is in Axolotl's KD v2 format: no manifest, so its tokenizer cannot be checked",
                    config.path)
        return Dataset(table), None, k
    manifest = Manifest.read(config.path)
    check_manifest(manifest, config.path, tokenizer=tokenizer, sequence_len=cfg.sequence_len, top_k=config.top_k,
                   sequences=sequences)
    check_teacher_pair(manifest, config, tokenizer)
    wants_eval = bool(cfg.val_set_size) or bool(cfg.test_datasets)
    if wants_eval and "eval" not in manifest.splits:
        raise ValueError(f"{Path(config.path) / MANIFEST}: splits {sorted(manifest.splits)} have no 'eval', but the "
                         "config asks for evaluation (val_set_size / test_datasets); precompute again with it.")
    train = load_split(config.path, manifest, "train")
    evaluation = load_split(config.path, manifest, "eval") if wants_eval else None
    LOG.info("xkd: precomputed teacher %s (k=%d, %d train rows)", manifest.teacher, manifest.top_k, len(train))
    return train, evaluation, manifest.top_k


def with_length(dataset):
    """`dataset` plus Axolotl's `length` column (tokens per row), held in memory."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False)
    return dataset.add_column("length", lengths.astype(np.int64).tolist())


def load_datasets_meta(cfg, config: PrecomputedTeacher, *, sequences: str = "dataset"):
    """Axolotl's TrainDatasetMeta for the precomputed data, with the step count Axolotl would compute."""
    from axolotl.loaders import load_tokenizer

    train, evaluation, _ = load_precomputed(cfg, config, load_tokenizer(cfg), sequences=sequences)
    return training_meta(cfg, train, evaluation)


def training_meta(cfg, train, evaluation):
    """Axolotl's TrainDatasetMeta of rows read here (not prepared by Axolotl): its `length` column where it packs,
    and the step count Axolotl would compute."""
    from axolotl.common.datasets import TrainDatasetMeta
    from axolotl.utils.trainer import calculate_total_num_steps

    # Axolotl's multipack sampler and step estimate read a `length` column, as its own packing prep adds.
    if cfg.sample_packing:
        train = with_length(train)
    if evaluation is not None and cfg.eval_sample_packing:
        evaluation = with_length(evaluation)
    total = calculate_total_num_steps(cfg, train)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return TrainDatasetMeta(train_dataset=train, eval_dataset=evaluation, total_num_steps=total)


def load_split(folder: str | Path, manifest: Manifest, split: str, *, validate: bool = True):
    """All shards of `split` as one `datasets.Dataset`, rows in order; each shard checked against the hash the
    manifest recorded when it was written, then validated row by row."""
    from datasets import concatenate_datasets, load_from_disk

    missing = missing_shards(folder, manifest, split)
    if missing:
        raise FileNotFoundError(
            f"{shard_dir(folder, split, missing[0])} is missing ({len(missing)} of {manifest.shards(split)} "
            f"shards of split {split!r}): the precompute did not finish. Rerun the same "
            "`axolotl xkd precompute` command; it resumes where it stopped."
        )
    parts, first, unhashed = [], 0, 0
    for i in range(manifest.shards(split)):
        if validate:
            unhashed += not check_shard(folder, manifest, split, i)  # before loading: a truncated shard may not load
        part = load_from_disk(str(shard_dir(folder, split, i)))
        if validate:
            validate_rows(part.data.table, top_k=manifest.top_k, vocab_size=manifest.vocab_size,
                          first_row=first, where=str(shard_dir(folder, split, i)))
        first += len(part)
        parts.append(part)
    if unhashed:
        LOG.warning("xkd: %d of %d shards of split %r in %s have no content hash in %s (written before stores "
                    "carried them): damage to them cannot be detected.", unhashed, manifest.shards(split), split,
                    folder, MANIFEST)
    dataset = concatenate_datasets(parts)
    if len(dataset) != manifest.splits[split]:
        raise ValueError(f"{Path(folder) / MANIFEST}: split {split!r} should hold {manifest.splits[split]} rows, "
                         f"its shards hold {len(dataset)}; rerun the precompute into an empty folder.")
    return dataset
