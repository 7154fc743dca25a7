"""The on-disk format of a precomputed teacher: tokenized rows plus the teacher's top-k per response position.

A store is a folder written by `axolotl xkd precompute`:

    DIR/manifest.json            what made it (teacher, tokenizer hash, k, sequence_len, alignment, encoding)
    DIR/<split>/shard-00000/     Hugging Face `datasets` Arrow shards (save_to_disk), rows in order

Each row holds `input_ids` and `labels` (int32) as Axolotl tokenized them, and the teacher's top-k for
its response positions only. Alignment: position i holds log p_T(. | u_<=i), the distribution over
u_{i+1}, the same position as the student's logits z_i; position i is a response position when
labels[i+1] != -100 (the loss counts exactly these). A row with R response positions stores R * k
entries, position-major, ids sorted by decreasing log-prob.

Encodings (manifest "encoding"):
- "packed_u32" (vocabularies up to 2^17 tokens, log-probs float16): column `xkd_topk`, one uint32 per
  entry = (float16 bits of -logprob) << 17 | token id. Log-probs are <= 0, so float16's sign bit is
  free and the packing is lossless at float16: 4 bytes per entry.
- "split": columns `xkd_topk_ids` (int32) and `xkd_topk_logprobs` (float16 or float32).

Imports numpy, pyarrow and datasets; nothing of Axolotl, transformers or the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FORMAT = "axolotl_xkd.topk"
VERSION = 1
MANIFEST = "manifest.json"
IGNORE_INDEX = -100
ALIGNMENT = (
    "student: position i holds the teacher's log-probs over u_{i+1} given u_<=i (the position of the "
    "student's logits z_i), stored for response positions only (labels[i+1] != -100), in order"
)
PACKED_ID_BITS = 17
PACKED_MAX_VOCAB = 1 << PACKED_ID_BITS
PACKED = "xkd_topk"
SPLIT_IDS = "xkd_topk_ids"
SPLIT_LOGPROBS = "xkd_topk_logprobs"
TOPK_COLUMNS = (PACKED, SPLIT_IDS, SPLIT_LOGPROBS)
# Stored probabilities of one position may sum above 1 by float16 rounding: at most about
# 2^-11 * entropy (<= 12 nats), so 1e-2 leaves room while catching real errors.
PROB_SUM_TOLERANCE = 1e-2


@dataclass
class Manifest:
    """What a store holds and how it was made; compared with the training config before use."""

    teacher: str
    tokenizer_hash: str
    vocab_size: int
    top_k: int
    sequence_len: int
    encoding: str
    logprob_dtype: str
    rows_per_shard: int
    splits: dict[str, int] = field(default_factory=dict)  # split -> number of rows
    alignment: str = ALIGNMENT
    temperature: float = 1.0
    format: str = FORMAT
    version: int = VERSION

    def shards(self, split: str) -> int:
        """Number of shards of `split`."""
        return -(-self.splits[split] // self.rows_per_shard)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of the store at `folder`; errors name the file."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: {folder} is not a store written by `axolotl xkd precompute`. "
                "Run `axolotl xkd precompute CONFIG.yml --out DIR` first, or set xkd.teacher.format: "
                "axolotl_kd_v2 for a dataset with target_token_ids/logprobs columns."
            )
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(
                f"{path}: format {data.get('format')!r} version {data.get('version')!r}, expected {FORMAT!r} "
                f"version {VERSION}; rerun `axolotl xkd precompute` with this axolotl_xkd version."
            )
        return cls(**data)

    def write(self, folder: str | Path) -> None:
        """Write atomically (tmp file + rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(self.to_json())
        os.replace(tmp, folder / MANIFEST)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of a tokenizer's token -> id map and special tokens: equal hashes tokenize ids alike."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {name: getattr(tokenizer, name, None) for name in
                    ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def choose_encoding(vocab_size: int, logprob_dtype: str) -> str:
    """packed_u32 where it is lossless (float16 log-probs, ids below 2^17), else split."""
    return "packed_u32" if logprob_dtype == "float16" and vocab_size <= PACKED_MAX_VOCAB else "split"


def response_mask(labels: np.ndarray) -> np.ndarray:
    """(T,) bool: position i is a response position when labels[i+1] is not masked."""
    mask = np.zeros(len(labels), dtype=bool)
    mask[:-1] = np.asarray(labels[1:]) != IGNORE_INDEX
    return mask


def encode(ids: np.ndarray, logprobs: np.ndarray, encoding: str, logprob_dtype: str) -> dict[str, np.ndarray]:
    """(R, k) ids and log-probs -> the flat column values of one row."""
    if encoding == "packed_u32":
        neg = (-np.minimum(logprobs.astype(np.float32), 0.0)).astype(np.float16)
        bits = neg.view(np.uint16).astype(np.uint32) & 0x7FFF  # drop the sign bit (of -0.0)
        return {PACKED: ((bits << PACKED_ID_BITS) | ids.astype(np.uint32)).reshape(-1)}
    return {SPLIT_IDS: ids.astype(np.int32).reshape(-1), SPLIT_LOGPROBS: logprobs.astype(logprob_dtype).reshape(-1)}


def decode(columns: dict, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat column values (one row or several rows' concatenation) -> (N, k) int64 ids, float32 log-probs."""
    if PACKED in columns:
        code = np.asarray(columns[PACKED], dtype=np.uint32)
        ids = (code & (PACKED_MAX_VOCAB - 1)).astype(np.int64)
        logprobs = -(code >> PACKED_ID_BITS).astype(np.uint16).view(np.float16).astype(np.float32)
    else:
        ids = np.asarray(columns[SPLIT_IDS], dtype=np.int64)
        logprobs = np.asarray(columns[SPLIT_LOGPROBS], dtype=np.float32)
    return ids.reshape(-1, top_k), logprobs.reshape(-1, top_k)


def topk_field(columns) -> str:
    """The column the top-k data lives in (for error messages)."""
    return PACKED if PACKED in columns else SPLIT_LOGPROBS


class RowError(ValueError):
    """A stored row is inconsistent; the message names the row index and the field."""


def validate_rows(batch: pa.Table | pa.RecordBatch, *, top_k: int, vocab_size: int, first_row: int = 0,
                  where: str = "") -> None:
    """Check rows of a store: top-k lengths match the tokens, log-probs are finite or -inf, ids lie in
    the vocabulary, and each position's probabilities sum to at most 1 (+ float16 rounding).

    Raises RowError naming the (global) row index, the field and what to do; never skips a row.
    """
    prefix = f"{where}: " if where else ""
    names = batch.schema.names
    field_name = topk_field(names)
    ids_col, labels_col = batch.column(names.index("input_ids")), batch.column(names.index("labels"))
    n_rows = batch.num_rows
    token_lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False)
    label_lengths = pc.list_value_length(labels_col).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(token_lengths != label_lengths)
    if bad.size:
        r = int(bad[0])
        raise RowError(f"{prefix}row {first_row + r}, field 'labels': {label_lengths[r]} labels for "
                       f"{token_lengths[r]} input_ids; the row is corrupt, rerun the precompute.")
    labels = pc.list_flatten(labels_col).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(label_lengths)])
    nxt = np.zeros(len(labels), dtype=bool)
    nxt[:-1] = labels[1:] != IGNORE_INDEX
    nxt[offsets[1:][label_lengths > 0] - 1] = False  # a row's last position has no next label
    per_row = np.add.reduceat(nxt.astype(np.int64), offsets[:-1]) if len(labels) else np.zeros(n_rows, np.int64)
    per_row = np.where(label_lengths > 0, per_row, 0)
    topk_col = batch.column(names.index(field_name))
    stored = pc.list_value_length(topk_col).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(stored != per_row * top_k)
    if bad.size:
        r = int(bad[0])
        raise RowError(
            f"{prefix}row {first_row + r}, field {field_name!r}: {stored[r]} top-k entries, but the row has "
            f"{per_row[r]} response positions x k={top_k} = {per_row[r] * top_k}; its top-k data does not "
            "match its tokens. Rerun `axolotl xkd precompute` for this data."
        )
    if SPLIT_IDS in names:
        id_lengths = pc.list_value_length(batch.column(names.index(SPLIT_IDS))).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(id_lengths != stored)
        if bad.size:
            r = int(bad[0])
            raise RowError(f"{prefix}row {first_row + r}, field {SPLIT_IDS!r}: {id_lengths[r]} ids for "
                           f"{stored[r]} log-probs; rerun `axolotl xkd precompute` for this data.")
    flat = {name: pc.list_flatten(batch.column(names.index(name))).to_numpy(zero_copy_only=False)
            for name in TOPK_COLUMNS if name in names}
    ids, logprobs = decode(flat, top_k)
    row_of_position = np.repeat(np.arange(n_rows), per_row)

    def fail(position_mask: np.ndarray, field_: str, what: str) -> None:
        hits = np.flatnonzero(position_mask)
        if hits.size:
            p = int(hits[0])
            r = int(row_of_position[p])
            nth = p - int(np.sum(per_row[:r]))
            raise RowError(f"{prefix}row {first_row + r}, field {field_!r}: {what} at its response position "
                           f"#{nth}; the stored teacher data is invalid. Rerun `axolotl xkd precompute`, or fix "
                           "the row in the source dataset.")

    lp_field = PACKED if PACKED in names else SPLIT_LOGPROBS
    fail(np.isnan(logprobs).any(-1), lp_field, "NaN log-prob")
    fail(np.isposinf(logprobs).any(-1), lp_field, "+inf log-prob")
    fail((np.isfinite(logprobs) & (logprobs > 0)).any(-1), lp_field, "log-prob above 0")
    id_field = PACKED if PACKED in names else SPLIT_IDS
    fail(((ids < 0) | (ids >= vocab_size)).any(-1), id_field, f"token id outside the vocabulary [0, {vocab_size})")
    mass = np.exp(logprobs.astype(np.float64)).sum(-1)
    fail(mass > 1.0 + PROB_SUM_TOLERANCE, lp_field,
         f"probabilities summing above 1 (+{PROB_SUM_TOLERANCE} rounding tolerance)")


def shard_dir(folder: str | Path, split: str, index: int) -> Path:
    return Path(folder) / split / f"shard-{index:05d}"


def write_shard(dataset, folder: str | Path, split: str, index: int) -> Path:
    """Save a `datasets.Dataset` as shard `index` atomically: into a tmp folder, then one rename."""
    final = shard_dir(folder, split, index)
    # One rank writes a given shard, so the tmp name needs no pid; a rerun clears a killed run's leftovers.
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    dataset.save_to_disk(str(tmp))  # num_proc=None: no process pool (num_proc=1 spawns one)
    os.replace(tmp, final)
    return final


def missing_shards(folder: str | Path, manifest: Manifest, split: str) -> list[int]:
    """Indices of the shards of `split` not yet written."""
    return [i for i in range(manifest.shards(split)) if not shard_dir(folder, split, i).is_dir()]


def load_split(folder: str | Path, manifest: Manifest, split: str, *, validate: bool = True):
    """All shards of `split` as one `datasets.Dataset`, rows in order; validated row by row."""
    from datasets import concatenate_datasets, load_from_disk

    missing = missing_shards(folder, manifest, split)
    if missing:
        raise FileNotFoundError(
            f"{shard_dir(folder, split, missing[0])} is missing ({len(missing)} of {manifest.shards(split)} "
            f"shards of split {split!r}): the precompute did not finish. Rerun the same "
            "`axolotl xkd precompute` command; it resumes where it stopped."
        )
    parts, first = [], 0
    for i in range(manifest.shards(split)):
        part = load_from_disk(str(shard_dir(folder, split, i)))
        if validate:
            validate_rows(part.data.table, top_k=manifest.top_k, vocab_size=manifest.vocab_size,
                          first_row=first, where=str(shard_dir(folder, split, i)))
        first += len(part)
        parts.append(part)
    dataset = concatenate_datasets(parts)
    if len(dataset) != manifest.splits[split]:
        raise ValueError(f"{Path(folder) / MANIFEST}: split {split!r} should hold {manifest.splits[split]} rows, "
                         f"its shards hold {len(dataset)}; rerun the precompute into an empty folder.")
    return dataset
