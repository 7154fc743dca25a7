"""Precomputed-teacher benchmark: stored bytes per token for k = 16, 64, 128, and precompute throughput as
a ratio to a bare teacher forward pass over the same rows, measured in the same run.

    python -m benchmarks.precompute [--teacher DIR] [--rows N] [--seq-len T] [--vocab V] [--batch-size B]

Without --teacher it builds a Llama-shaped random teacher in code (nothing is downloaded). Rows are
synthetic prompt/response sequences (half of each row is response). Writes
benchmarks/results/precompute.md and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import axolotl_xkd
from axolotl_xkd.store.format import choose_encoding
from axolotl_xkd.store.write import pad_batch, records, shard_table, write_shard
from axolotl_xkd.teachers.model import ModelTeacherSource
from benchmarks import write_report

RESULTS = Path(__file__).parent / "results" / "precompute.md"


def make_rows(count: int, length: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        n = int(rng.integers(length // 2, length + 1))
        ids = rng.integers(4, vocab, size=n)
        prompt = n // 2
        rows.append({"input_ids": ids.tolist(), "labels": [-100] * prompt + ids[prompt:].tolist()})
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def bare_forward(model, rows, batch_size, pad_id, device) -> float:
    """Seconds for the teacher forward alone (logits materialised, nothing else)."""
    sync(device)
    start = time.perf_counter()
    for b in range(0, len(rows), batch_size):
        batch, _ = pad_batch(rows[b: b + batch_size], pad_id, device)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    sync(device)
    return time.perf_counter() - start


def full_precompute(model, rows, batch_size, pad_id, device, k, vocab, out: Path, rows_per_shard: int) -> float:
    """Seconds for what `axolotl xkd precompute` does per shard: forward, top-k, encode, atomic write."""
    from datasets import Dataset

    encoding = choose_encoding(vocab, "float16")
    source = ModelTeacherSource(model, vocab)
    sync(device)
    start = time.perf_counter()
    for index, s in enumerate(range(0, len(rows), rows_per_shard)):
        shard = rows[s: s + rows_per_shard]
        scored = []
        for b in range(0, len(shard), batch_size):
            batch, response = pad_batch(shard[b: b + batch_size], pad_id, device)
            scored += records(source, batch, response, width=k, vocab_size=vocab)
        write_shard(Dataset(shard_table(shard, scored, encoding=encoding, logprob_dtype="float16")), out, "train",
                    index)
    sync(device)
    return time.perf_counter() - start


def stored_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.arrow"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="teacher model folder (default: random Llama built here)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the built teacher")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the built teacher")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows-per-shard", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.teacher:
        model = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype)
        vocab = model.config.get_text_config().vocab_size
        name = args.teacher
    else:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=max(2048, args.seq_len))
        model = LlamaForCausalLM(config).to(dtype)
        vocab = args.vocab
        name = f"random Llama (hidden {args.hidden}, {args.layers} layers, vocab {vocab})"
    model = model.eval().to(device)
    rows = make_rows(args.rows, args.seq_len, vocab, seed=0)
    tokens = sum(len(r["input_ids"]) for r in rows)
    response = sum(int(np.sum(np.asarray(r["labels"][1:]) != -100)) for r in rows)
    bare_forward(model, rows[: args.batch_size], args.batch_size, 0, device)  # warm-up

    lines = []
    for k in (16, 64, 128):
        bare, full = [], []
        for _ in range(args.repeats):
            out = Path(tempfile.mkdtemp(prefix="xkd_bench_"))
            bare.append(bare_forward(model, rows, args.batch_size, 0, device))
            full.append(full_precompute(model, rows, args.batch_size, 0, device, k, vocab, out,
                                        args.rows_per_shard))
            size = stored_bytes(out)
            shutil.rmtree(out)
        bare_tps, full_tps = tokens / float(np.median(bare)), tokens / float(np.median(full))
        lines.append(
            f"| {k} | {size / tokens:.1f} | {4 * k + 8} | {size / response:.1f} | {bare_tps:,.0f} | {full_tps:,.0f} | "
            f"{full_tps / bare_tps:.2f} |"
        )
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    command = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if value is not None)
    report = "\n".join([
        "# Precompute benchmark",
        "",
        f"`python -m benchmarks.precompute {command}`",
        "",
        f"- date {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}, axolotl_xkd "
        f"{axolotl_xkd.__version__}, torch {torch.__version__}, device {device_name} ({device.type}, {dtype})",
        f"- teacher: {name}; {len(rows)} rows, {tokens} tokens, {response} response positions; encoding "
        f"{choose_encoding(vocab, 'float16')}",
        "- bytes/token: Arrow shard bytes (input_ids, labels, top-k) / all tokens; per response: / response positions",
        "- throughput: tokens/s, median of repeats; full = forward + top-k + encode + atomic shard write",
        "",
        "| k | bytes/token | aim 4k+8 | bytes/response position | bare forward tok/s | precompute tok/s | ratio |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
    ])
    write_report(RESULTS, report)


if __name__ == "__main__":
    main()
