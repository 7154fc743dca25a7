"""Writing a store (`axolotl xkd precompute`): run the teacher once over the training rows and store its top-k.

Rows come from Axolotl's own dataset preparation (axolotl.common.datasets.load_datasets), so they are
tokenized, filtered and split exactly as `axolotl train` will see them. Shards of `rows_per_shard`
rows are written atomically (tmp folder + rename) and skipped when present, so an interrupted run
resumes without duplicating or losing rows; under torchrun, rank r takes shards r, r + W, ...
With `generate`, each row's response is first replaced by one the teacher samples for its prompt
(seeded per shard, so resuming stays row-for-row identical), and the top-k is taken on that sequence.
With `server`, a running teacher server (vLLM's `vllm serve`, or `axolotl xkd serve-teacher`) is asked
for the rows' prompt_logprobs instead of loading the teacher here.
Imports torch and the teacher-server client, transformers and Axolotl inside the functions that need them; the
CLI module imports it lazily. Nothing of the trainer.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from axolotl_xkd.args import GenerationSettings, ServerTeacher
from axolotl_xkd.frozen_teacher import load_frozen_teacher, output_layer_is_linear, special_tokens, tokenizer_hash
from axolotl_xkd.keys import TOPK_IDS, TOPK_LOGPROBS, TOPK_PACKED
from axolotl_xkd.integrity import folder_sha256, locked
from axolotl_xkd.sequences import pad_token_id, prompt_to_answer, response_rows, right_pad, sample_responses
from axolotl_xkd.server.client import TeacherServerClient
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

LOG = logging.getLogger("axolotl_xkd")

_ARROW_TYPES = {TOPK_PACKED: pa.uint32(), TOPK_IDS: pa.int32(), "float16": pa.float16(), "float32": pa.float32()}


@dataclass(frozen=True)
class PrecomputeSettings:
    """What a precompute run needs besides the Axolotl config."""

    out: str
    teacher: str
    top_k: int
    batch_size: int = 8
    rows_per_shard: int = 1024
    logprob_dtype: str = "float16"
    generate: GenerationSettings | None = None  # --generate: store the teacher's responses instead of the dataset's
    seed: int = 0
    server: ServerTeacher | None = None  # --server: ask a running teacher server instead of loading the teacher
    server_api_key: str | None = field(default=None, repr=False)  # read from the block's api_key_env
    # load_frozen_teacher's options from the config's `xkd.teacher` (tokenizer_path, trust_remote_code,
    # attn_implementation), so the precompute loads the teacher as training would.
    loading: dict = field(default_factory=dict)
    cross_tokenizer: bool = False  # a teacher of another tokenizer, aligned to the student's positions


def pad_batch(rows: list[dict], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and the response-position mask (B, T) of `rows`."""
    ids, attention = right_pad([r["input_ids"] for r in rows], pad_id)
    response, _ = right_pad([response_mask(r["labels"]) for r in rows], 0)
    return ids.to(device), attention.to(device), response.bool().to(device)


@torch.no_grad()
def score_rows(model: nn.Module, rows: list[dict], *, top_k: int, vocab_size: int, pad_id: int,
               device: torch.device) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, the teacher's top-k (ids, log-probs), each (R_row, k), at its response positions.

    Log-probs are over the full tokenizer vocabulary at temperature 1, computed in float32. With a plain
    Linear output layer only the response positions' logits are formed (the decoder's hidden states are
    picked first), so the output layer costs less than in a bare forward; only their top k are
    normalised, with no (R, V) log_softmax copy.
    """
    ids, attention, response = pad_batch(rows, pad_id, device)
    if output_layer_is_linear(model):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
        picked = model.get_output_embeddings()(hidden[response])[:, :vocab_size].float()
    else:
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        picked = logits[response][:, :vocab_size].float()
    values, indices = picked.topk(top_k, dim=-1)  # ranking the logits ranks the log-probs
    values -= torch.logsumexp(picked, dim=-1, keepdim=True)
    values, indices = values.cpu().numpy(), indices.cpu().numpy()
    counts = response.sum(-1).tolist()
    bounds = np.cumsum([0, *counts])
    return [(indices[a:b], values[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def score_aligned(source, rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, an aligned teacher's records (ids, log-probs), each (R_row, k + 1), at its response positions:
    `teachers.aligned.AlignedTeacherSource.get_signal` on the rows, as training would compute it."""
    ids, attention, response = pad_batch(rows, 0, torch.device("cpu"))
    labels, _ = right_pad([r["labels"] for r in rows], -100)
    signal = source.get_signal({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return [(signal.token_ids[b][response[b]].numpy(), signal.logprobs[b][response[b]].float().numpy())
            for b in range(len(rows))]


def response_entries(rows: list[dict],
                     answers: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """A teacher server's per-position top-k of each row (`TeacherServerClient.score`, rows aligned as the
    student's logits) cut to the row's response positions, as `score_rows` returns them."""
    picked = []
    for row, (ids, logprobs) in zip(rows, answers):
        mask = response_mask(np.asarray(row["labels"]))
        picked.append((ids[mask].astype(np.int64), logprobs[mask].astype(np.float32)))
    return picked


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


def prepared_splits(cfg) -> dict:
    """Axolotl's own train (and eval) rows for `cfg`, exactly as `axolotl train` prepares them."""
    from axolotl.common.datasets import load_datasets

    meta = load_datasets(cfg=cfg)
    splits = {"train": meta.train_dataset}
    if meta.eval_dataset is not None:
        splits["eval"] = meta.eval_dataset
    return splits


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


def connect_server(settings: PrecomputeSettings, tokenizer, fingerprint: str) -> TeacherServerClient | None:
    """The checked client of `--server`, or None when the teacher runs in this process."""
    if settings.server is None:
        return None
    if settings.generate is not None:
        raise ValueError("--generate samples responses with the teacher model in this process; a teacher server "
                         "(--server) is only asked for log-probs. Drop --server, or drop --generate.")
    client = TeacherServerClient(settings.server, api_key=settings.server_api_key)
    client.check_server(tokenizer, fingerprint)
    return client


def new_manifest(cfg, settings: PrecomputeSettings, tokenizer, splits: dict, *, fingerprint: str,
                 teacher: str, aligned=None) -> Manifest:
    """The manifest of the store these settings make (`aligned`: the AlignedTeacherSource of a teacher of another
    tokenizer, whose records have its width and whose pair is recorded)."""
    return Manifest(
        teacher=teacher,
        tokenizer_hash=fingerprint,
        vocab_size=len(tokenizer),
        special_tokens=special_tokens(tokenizer),
        top_k=settings.top_k if aligned is None else aligned.width,
        sequence_len=int(cfg.sequence_len),
        encoding=choose_encoding(len(tokenizer), settings.logprob_dtype),
        logprob_dtype=settings.logprob_dtype,
        rows_per_shard=settings.rows_per_shard,
        splits={name: len(ds) for name, ds in splits.items()},
        sequences="dataset" if settings.generate is None else "teacher",
        generation=None if settings.generate is None else {**settings.generate.model_dump(), "seed": settings.seed},
        teacher_tokenizer_hash=None if aligned is None else tokenizer_hash(aligned.aligner.teacher),
        vocab_map=None if aligned is None else aligned.aligner.vocab.digest(),
    )


@dataclass
class ShardScorer:
    """The teacher of a precompute (a model in this process, a teacher of another tokenizer aligned here, or a
    server's client) and how it scores a shard."""

    settings: PrecomputeSettings
    manifest: Manifest
    tokenizer: object
    model: nn.Module | None = None
    client: TeacherServerClient | None = None
    aligned: object | None = None  # teachers.aligned.AlignedTeacherSource (--cross-tokenizer)
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(cls, settings: PrecomputeSettings, manifest: Manifest, tokenizer, client: TeacherServerClient | None,
             aligned=None) -> ShardScorer:
        """Load the teacher model (bfloat16 on a GPU that has it, else float32) unless a server or an aligned teacher
        (already loaded) scores."""
        if client is not None or aligned is not None:
            return cls(settings, manifest, tokenizer, client=client, aligned=aligned)
        device, dtype = teacher_placement()
        model = load_frozen_teacher(settings.teacher, dtype=dtype, student_tokenizer=tokenizer, **settings.loading)[0]
        return cls(settings, manifest, tokenizer, model=model.to(device), device=device)

    def score(self, rows: list[dict], split: str, index: int, bar) -> tuple[list[dict], list]:
        """(rows, per-row top-k) of one shard; with --generate the rows carry the teacher's responses."""
        settings, pad_id = self.settings, pad_token_id(self.tokenizer)
        if settings.generate is not None:
            # Seeded per shard, so a resumed run samples exactly what an uninterrupted one would.
            torch.manual_seed(settings.seed * 1_000_003 + index * 2 + (split != "train"))
        batches = [rows[b: b + settings.batch_size] for b in range(0, len(rows), settings.batch_size)]
        # A server gets every batch of the shard at once; its client keeps `concurrency` requests in flight.
        answers = [self.client.submit([r["input_ids"] for r in batch]) for batch in batches] if self.client else None
        scored = []
        for i, batch in enumerate(batches):
            if answers is not None:
                scored += response_entries(batch, answers[i].result())
            elif self.aligned is not None:
                scored += score_aligned(self.aligned, batch)
            else:
                if settings.generate is not None:
                    batch = batches[i] = teacher_rows(self.model, batch, settings.generate, pad_id=pad_id,
                                                      eos_id=self.tokenizer.eos_token_id,
                                                      max_length=self.manifest.sequence_len)
                scored += score_rows(self.model, batch, top_k=settings.top_k, vocab_size=self.manifest.vocab_size,
                                     pad_id=pad_id, device=self.device)
            bar.update(sum(len(r["input_ids"]) for r in batch))
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

    tokenizer = load_tokenizer(cfg)
    splits = prepared_splits(cfg)
    if not 1 <= settings.top_k <= len(tokenizer):
        raise ValueError(f"--top-k {settings.top_k} must lie in [1, {len(tokenizer)}] (the vocabulary size)")
    fingerprint = tokenizer_hash(tokenizer)
    aligned = _aligned_source(settings, tokenizer) if settings.cross_tokenizer else None
    client = connect_server(settings, tokenizer, fingerprint)
    try:
        teacher = str(settings.teacher) if client is None else f"{client.base_url} (model {client.model})"
        manifest = open_store(new_manifest(cfg, settings, tokenizer, splits, fingerprint=fingerprint,
                                           teacher=teacher, aligned=aligned), settings.out)
        todo = [(name, i) for name in splits for i in missing_shards(settings.out, manifest, name)
                if i % world_size == rank]
        if todo:
            write_shards(ShardScorer.load(settings, manifest, tokenizer, client, aligned), splits, todo, rank=rank,
                         progress=progress)
        else:
            LOG.info("xkd precompute: %s is complete", settings.out)
    finally:
        if client is not None:
            client.close()
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


def _aligned_source(settings: PrecomputeSettings, tokenizer):
    """The teacher of another tokenizer (--cross-tokenizer), loaded and placed, with its alignment to `tokenizer`;
    sampling (--generate) and teacher servers (--server) are not aligned yet."""
    from axolotl_xkd.cross_tokenizer import KEY, Aligner
    from axolotl_xkd.teachers.aligned import AlignedTeacherSource

    if settings.generate is not None or settings.server is not None:
        raise ValueError(f"--cross-tokenizer ({KEY}) aligns a teacher model loaded here; it does not yet combine "
                         "with --generate or --server. Drop them, or use a teacher of the student's tokenizer.")
    device, dtype = teacher_placement()
    model, teacher_tokenizer = load_frozen_teacher(settings.teacher, dtype=dtype, student_tokenizer=tokenizer,
                                                   cross_tokenizer=True, **settings.loading)
    aligner = Aligner(tokenizer, teacher_tokenizer, f"--teacher {settings.teacher!r} with {KEY}")
    LOG.info("xkd precompute, cross-tokenizer teacher: %s", aligner.summary())
    return AlignedTeacherSource(model.to(device), aligner, top_k=settings.top_k)
