"""Writing a store (`axolotl xkd precompute`): run the teacher once over the training rows and store its top-k.

Rows come from Axolotl's own dataset preparation (axolotl.common.datasets.load_datasets), so they are
tokenized, filtered and split exactly as `axolotl train` will see them. Shards of `rows_per_shard`
rows are written atomically (tmp folder + rename) and skipped when present, so an interrupted run
resumes without duplicating or losing rows; under torchrun, rank r takes shards r, r + W, ...
With `generate`, each row's response is first replaced by one the teacher samples for its prompt
(seeded per shard, so resuming stays row-for-row identical), and the top-k is taken on that sequence; among several
teachers (store/generated.py) another model may sample, a store may hold only its routed rows, or score the rows
another store's run generated.
The teacher is any teacher source built from its block (`teachers.build.build_teacher`: a model here, a teacher
server such as vLLM's `vllm serve` or `axolotl xkd serve-teacher`, either of another tokenizer aligned to the
student's): a store is that source's signal at the response positions, recorded as top-k records.
Imports torch and the teacher sources, transformers and Axolotl inside the functions that need them; the CLI module
imports it lazily. Nothing of the trainer.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from axolotl_xkd.args import GenerationSettings, ModelTeacher, ServerTeacher
from axolotl_xkd.frozen_teacher import special_tokens, tokenizer_hash
from axolotl_xkd.integrity import folder_sha256, locked
from axolotl_xkd.keys import ROUTE, TOPK_IDS, TOPK_LOGPROBS, TOPK_PACKED
from axolotl_xkd.sequences import pad_token_id, prompt_to_answer, response_rows, right_pad, sample_responses
from axolotl_xkd.store.format import (
    MANIFEST,
    Manifest,
    choose_encoding,
    encode,
    missing_shards,
    record_shard,
    response_mask,
    shard_dir,
)
from axolotl_xkd.teachers.base import TeacherSource

LOG = logging.getLogger("axolotl_xkd")

_ARROW_TYPES = {TOPK_PACKED: pa.uint32(), TOPK_IDS: pa.int32(), "float16": pa.float16(), "float32": pa.float32()}


@dataclass(frozen=True)
class RoutedRows:
    """Under `mixture: route`: the routing of the config's rows and the teacher whose rows a store holds."""

    column: str | None  # None: rows routed by their dataset entry only
    names: tuple[str, ...]
    default: str | None
    index: int  # the store's teacher in `names`
    entries: dict | None = None  # the teacher each dataset entry names (routing.entry_teachers of the raw YAML)


@dataclass(frozen=True)
class PrecomputeSettings:
    """What a precompute run needs besides the Axolotl config."""

    out: str
    # The teacher block to build (teachers.build.build_teacher): a model run here (--teacher, a `source: model`
    # block, or model_path), or a teacher server (--server, a `source: server` block); its cross_tokenizer keys
    # align a teacher of another tokenizer.
    teacher: ModelTeacher | ServerTeacher
    top_k: int
    batch_size: int = 8
    rows_per_shard: int = 1024
    logprob_dtype: str = "float16"
    generate: GenerationSettings | None = None  # --generate: store the teacher's responses instead of the dataset's
    seed: int = 0
    teacher_name: str | None = None  # the xkd.teachers item the store records (checked by training)
    # Among several teachers (store/generated.py): the model that samples when it is not `teacher` (xkd.generator),
    # the rows routed to this store's teacher only, or a store whose generated rows this one scores instead of
    # sampling its own; `generated_by` (which teacher sampled, routed or not) goes into the manifest's generation.
    generator: ModelTeacher | None = None
    routed: RoutedRows | None = None
    rows_from: str | None = None
    generated_by: dict | None = None

    @property
    def samples(self) -> bool:
        """Whether this run samples responses itself (not when it scores another store's generated rows)."""
        return self.generate is not None and self.rows_from is None

    def generation(self) -> dict | None:
        """The manifest's record of the generated rows: sampling settings, seed and who sampled them."""
        if self.generate is None:
            return None
        return {**self.generate.model_dump(), "seed": self.seed, **(self.generated_by or {})}


def pad_batch(rows: list[dict], pad_id: int, device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """`rows` as a collated batch (right-padded input_ids, attention_mask and labels, (B, T)) and its response-position
    mask (B, T)."""
    ids, attention = right_pad([r["input_ids"] for r in rows], pad_id)
    labels, _ = right_pad([r["labels"] for r in rows], -100)
    response, _ = right_pad([response_mask(r["labels"]) for r in rows], 0)
    batch = {"input_ids": ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}
    return batch, response.bool().to(device)


@torch.no_grad()
def records(source: TeacherSource, batch: dict[str, Tensor], response: Tensor, *, width: int,
            vocab_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row of `batch`, the teacher's top-k records (ids, log-probs), each (R_row, width), at its response
    positions (`response`, (B, T)), in int64 and float32.

    A source with hidden states (`fusable`) has its logits formed at the response positions only, a block of rows
    at a time, and only their top k normalised (log-probs over the student's `vocab_size` tokens at temperature 1,
    no (R, V) log-softmax copy); a source of records (a server, a teacher of another tokenizer) gives its own, as
    training reads them (`TeacherSource.record_width`).
    """
    signal = source.get_hidden_signal(batch) if source.fusable else source.get_signal(batch)
    picked = signal.rows(response).cut(vocab_size).top_k(width)
    ids = picked.token_ids.cpu().numpy().astype(np.int64)
    logprobs = picked.logprobs.float().cpu().numpy()
    bounds = np.cumsum([0, *response.sum(-1).tolist()])
    return [(ids[a:b], logprobs[a:b]) for a, b in pairwise(bounds)]


def teacher_rows(model: nn.Module, rows: list[dict], sampling: GenerationSettings, *, pad_id: int, eos_id: int | None,
                 max_length: int) -> list[dict]:
    """`rows` with each response replaced by the teacher's sample for the row's prompt; a row without any label is a
    prompt without an answer, which the teacher answers (`prompt_to_answer`)."""
    prompts = [prompt_to_answer(r["input_ids"], r["labels"], eos_id=eos_id) for r in rows]
    asked = [p for p in prompts if p is not None]
    answers = iter(sample_responses(model, asked, sampling, pad_id=pad_id, eos_id=eos_id, max_length=max_length)
                   if asked else [])
    return [row if p is None else response_rows([p], [next(answers)])[0] for row, p in zip(rows, prompts)]


def shard_table(rows: list[dict], scored: list[tuple[np.ndarray, np.ndarray]], *, encoding: str,
                logprob_dtype: str) -> pa.Table:
    """The Arrow table of one shard: input_ids, labels (int32) and the encoded top-k columns."""
    columns: dict[str, list[np.ndarray]] = {"input_ids": [], "labels": []}
    for row, (ids, logprobs) in zip(rows, scored):
        columns["input_ids"].append(np.asarray(row["input_ids"], dtype=np.int32))
        columns["labels"].append(np.asarray(row["labels"], dtype=np.int32))
        for name, values in encode(ids, logprobs, encoding, logprob_dtype).items():
            columns.setdefault(name, []).append(values)
    arrays = {}
    for name, parts in columns.items():
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)
        kind = _ARROW_TYPES.get(name, pa.int32()) if name != TOPK_LOGPROBS else _ARROW_TYPES[logprob_dtype]
        values = pa.array(np.concatenate(parts) if parts else np.zeros(0), type=kind)
        arrays[name] = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pa.table(arrays)


class StoreWriteError(OSError):
    """Writing the store failed (a full disk, a read-only folder); the message names the path and what to do."""


def write_error(path: Path, error: OSError) -> StoreWriteError:
    """The error a failed write of `path` raises: nothing half-written is left where a reader looks."""
    cause = error.strerror or str(error)
    if error.filename and str(error.filename) != str(path):
        cause += f": {error.filename}"
    return StoreWriteError(
        error.errno, f"{path}: writing failed ({cause}). Nothing half-written is left where "
        "training or a resumed precompute reads: the shards written before it and the manifest are intact. Free "
        "space (or fix the folder's permissions), then rerun the same `axolotl xkd precompute` command: it resumes "
        "with the missing shards.")


def write_shard(dataset, folder: str | Path, split: str, index: int) -> Path:
    """Save a `datasets.Dataset` as shard `index` atomically: into a tmp folder, its hash into the manifest, then
    one rename. A shard on disk always has its hash recorded; a kill before the rename leaves only the tmp folder
    (cleared when the shard is written again) and perhaps a hash that the rewrite replaces."""
    final = shard_dir(folder, split, index)
    # One rank writes a given shard, so the tmp name needs no pid; a rerun clears a killed run's leftovers.
    tmp = final.parent / f".tmp-{final.name}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        dataset.save_to_disk(str(tmp))  # num_proc=None: no process pool (num_proc=1 spawns one)
        record_shard(folder, split, index, folder_sha256(tmp))
        os.replace(tmp, final)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, error) from error
    return final


def prepared_splits(cfg, settings: PrecomputeSettings | None = None) -> dict:
    """Axolotl's own train (and eval) rows for `cfg`, exactly as `axolotl train` prepares them; with `settings.routed`
    only the rows routed to its teacher; with `settings.rows_from`, that store's generated rows instead."""
    if settings is not None and settings.rows_from is not None:
        from axolotl_xkd.store.generated import stored_rows

        return stored_rows(settings.rows_from, settings.generation())
    from axolotl.common.datasets import load_datasets

    routed = None if settings is None else settings.routed
    if routed is None:
        meta = load_datasets(cfg=cfg)
    else:
        from axolotl_xkd.routing import load_routed_datasets

        meta = load_routed_datasets(cfg, column=routed.column, names=list(routed.names), default=routed.default,
                                    entries=routed.entries)
    splits = {"train": meta.train_dataset}
    if meta.eval_dataset is not None:
        splits["eval"] = meta.eval_dataset
    if routed is None:
        return splits
    return {name: ds.select([i for i, route in enumerate(ds[ROUTE]) if route and route[0] == routed.index])
            for name, ds in splits.items()}


def check_resume(existing: Manifest, wanted: Manifest, out: str) -> None:
    """A rerun into a folder must use the same settings, or rows would mix two teachers."""
    theirs, ours = existing.settings(), wanted.settings()
    differ = [k for k in ours if theirs.get(k) != ours[k]]
    if differ:
        k = differ[0]
        raise ValueError(
            f"{Path(out) / 'manifest.json'}: {k} is {theirs.get(k)!r} there but {ours[k]!r} now; this folder holds "
            "another precompute. Use another --out, or delete the folder to start over."
        )


def open_store(wanted: Manifest, out: str) -> Manifest:
    """The manifest of the store at `out`: written now for a new store, or read (and checked against `wanted`) to
    resume one. Under the store's lock, as every rank of a torchrun precompute does this at once."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with locked(out):
        if (Path(out) / MANIFEST).is_file():
            existing = Manifest.read(out)
            check_resume(existing, wanted, out)
            return existing
        try:
            wanted.write(out)
        except OSError as error:
            raise write_error(Path(out) / MANIFEST, error) from error
    return wanted


def check_sampling(settings: PrecomputeSettings) -> None:
    """--generate samples with the teacher model (or `generator`) in this process, in the student's tokenizer: refuse
    a teacher server or a teacher of another tokenizer before any work."""
    if not settings.samples or settings.generator is not None:  # xkd.generator was checked with the config
        return
    if settings.teacher.source == "server":
        raise ValueError("--generate samples responses with the teacher model in this process; a teacher server "
                         "(--server) is only asked for log-probs. Drop --server, or drop --generate.")
    if settings.teacher.cross_tokenizer:
        from axolotl_xkd.cross_tokenizer import KEY

        raise ValueError(f"--cross-tokenizer ({KEY}) aligns a teacher model loaded here; it does not yet combine "
                         "with --generate or --server. Drop them, or use a teacher of the student's tokenizer.")


def teacher_description(settings: PrecomputeSettings, source: TeacherSource) -> str:
    """What the manifest names as the teacher: the model's path, or the server's root and the model it serves."""
    if settings.teacher.source == "server":
        return f"{source.client.base_url} (model {source.client.model})"
    return settings.teacher.path


def new_manifest(cfg, settings: PrecomputeSettings, tokenizer, splits: dict, *, fingerprint: str,
                 source: TeacherSource) -> Manifest:
    """The manifest of the store these settings make with `source`: its records' width and, for a teacher of another
    tokenizer, the pair it was aligned for (its tokenizer's hash and the vocabulary map's digest)."""
    aligner = source.aligner
    return Manifest(
        teacher=teacher_description(settings, source),
        tokenizer_hash=fingerprint,
        vocab_size=len(tokenizer),
        special_tokens=special_tokens(tokenizer),
        top_k=source.record_width(settings.top_k),
        sequence_len=int(cfg.sequence_len),
        encoding=choose_encoding(len(tokenizer), settings.logprob_dtype),
        logprob_dtype=settings.logprob_dtype,
        rows_per_shard=settings.rows_per_shard,
        splits={name: len(ds) for name, ds in splits.items()},
        sequences="dataset" if settings.generate is None else "teacher",
        generation=settings.generation(),
        teacher_tokenizer_hash=None if aligner is None else tokenizer_hash(aligner.teacher),
        vocab_map=None if aligner is None else aligner.vocab.digest(),
        teacher_name=settings.teacher_name,
    )


@dataclass
class ShardScorer:
    """A precompute's teacher source and how it scores a shard."""

    settings: PrecomputeSettings
    manifest: Manifest
    tokenizer: object
    source: TeacherSource
    device: torch.device  # where the batches go: the teacher's (teacher_placement)
    sampler: nn.Module | None = None  # the model that samples the responses (the teacher's, or xkd.generator's)

    def score(self, rows: list[dict], split: str, index: int, bar) -> tuple[list[dict], list]:
        """(rows, per-row top-k records) of one shard; with --generate the rows carry the teacher's responses.

        Every batch of the shard is submitted before the first signal is read, so a server keeps `concurrency`
        requests in flight (a model here has nothing to start)."""
        settings, manifest = self.settings, self.manifest
        batches = [rows[b: b + settings.batch_size] for b in range(0, len(rows), settings.batch_size)]
        if settings.samples:
            # Seeded per shard, so a resumed run samples exactly what an uninterrupted one would.
            torch.manual_seed(settings.seed * 1_000_003 + index * 2 + (split != "train"))
            batches = [teacher_rows(self.sampler, batch, settings.generate, pad_id=pad_token_id(self.tokenizer),
                                    eos_id=self.tokenizer.eos_token_id, max_length=manifest.sequence_len)
                       for batch in batches]
        padded = [pad_batch(batch, pad_token_id(self.tokenizer), self.device) for batch in batches]
        for batch, _ in padded:
            self.source.submit(batch)
        scored = []
        for rows_of_batch, (batch, response) in zip(batches, padded):
            scored += records(self.source, batch, response, width=manifest.top_k, vocab_size=manifest.vocab_size)
            bar.update(sum(len(r["input_ids"]) for r in rows_of_batch))
        return [row for batch in batches for row in batch], scored


def teacher_placement() -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype a precompute runs its teacher: this rank's GPU in bfloat16 where it has one, else the
    CPU in float32."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    return device, torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32


def run_precompute(cfg, settings: PrecomputeSettings, *, rank: int = 0, world_size: int = 1,
                   progress: bool = True) -> Manifest:
    """Write (or finish) the store at settings.out; returns its manifest."""
    from axolotl.loaders import load_tokenizer

    from axolotl_xkd.teachers.build import build_teacher

    check_sampling(settings)
    tokenizer = load_tokenizer(cfg)
    splits = prepared_splits(cfg, settings)
    if not 1 <= settings.top_k <= len(tokenizer):
        raise ValueError(f"--top-k {settings.top_k} must lie in [1, {len(tokenizer)}] (the vocabulary size)")
    device, dtype = teacher_placement()
    source = build_teacher(settings.teacher, student_tokenizer=tokenizer, dtype=dtype, device=device)
    sampler = None
    if settings.samples and settings.generator is not None:
        sampler = build_teacher(settings.generator, student_tokenizer=tokenizer, dtype=dtype, device=device)
    try:
        manifest = open_store(new_manifest(cfg, settings, tokenizer, splits, fingerprint=tokenizer_hash(tokenizer),
                                           source=source), settings.out)
        todo = [(name, i) for name in splits for i in missing_shards(settings.out, manifest, name)
                if i % world_size == rank]
        if todo:
            model = (sampler or source).model if settings.samples else None
            write_shards(ShardScorer(settings, manifest, tokenizer, source, device, model), splits, todo, rank=rank,
                         progress=progress)
        else:
            LOG.info("xkd precompute: %s is complete", settings.out)
    finally:
        source.close()
        if sampler is not None:
            sampler.close()
    return manifest


def write_shards(scorer: ShardScorer, splits: dict, todo: list[tuple[str, int]], *, rank: int,
                 progress: bool) -> None:
    """Score and write the shards `todo` ((split, index) pairs), in order, with a progress bar in tokens."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    per_shard, manifest = scorer.settings.rows_per_shard, scorer.manifest
    lengths = {name: np.asarray([len(x) for x in ds["input_ids"]]) for name, ds in splits.items()}
    total = int(sum(lengths[name][i * per_shard:(i + 1) * per_shard].sum() for name, i in todo))
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"xkd precompute (rank {rank})", disable=not progress)
    for name, index in todo:
        start = index * per_shard
        selected = splits[name].select(range(start, min(start + per_shard, len(splits[name]))))
        rows, scored = scorer.score([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in selected],
                                    name, index, bar)
        table = shard_table(rows, scored, encoding=manifest.encoding, logprob_dtype=manifest.logprob_dtype)
        write_shard(Dataset(table), scorer.settings.out, name, index)
    bar.close()
