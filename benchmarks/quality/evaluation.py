"""Scoring a trained student: batched generation on prompts (greedy or sampled) and the diversity
measures of the study (distinct-2 over tokens, self-BLEU between one prompt's samples). Also a CLI for
the paper-scale recipe:

    python -m benchmarks.quality.evaluation --model DIR --data eval.jsonl --metric rouge2|bleu|gsm8k \\
        [--max-new-tokens 128] [--batch-size 16] [--device cuda] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from axolotl_xkd.options import DTYPE_NAMES


def load(model_dir: Path, device: str = "cpu", dtype: str = "float32"):
    """(model in eval mode, tokenizer) of a saved student or teacher."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, max_length: int | None = None,
             temperature: float = 0.0, n: int = 1, seed: int = 0, batch_size: int = 128) -> list[str]:
    """n responses per prompt (prompt-major), decoded without special tokens; seeded when sampling."""
    import torch

    from axolotl_xkd.args import GenerationSettings
    from axolotl_xkd.sequences import sample_responses

    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    out = []
    for start in range(0, len(ids), batch_size):
        out += sample_responses(model, ids[start: start + batch_size], sampling, pad_id=pad,
                                eos_id=tokenizer.eos_token_id, n=n, max_length=max_length)
    return [tokenizer.decode(r, skip_special_tokens=True) for r in out]


def diversity(samples: list[str], n: int, tokenizer) -> dict[str, float]:
    """distinct-2 (unique token bigrams / all bigrams over every sample) and self-BLEU (mean sentence BLEU,
    character level, of each sample against the other n-1 samples of its prompt; lower = more diverse)."""
    import sacrebleu

    tokens = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in samples]
    bigrams = [tuple(t[i: i + 2]) for t in tokens for i in range(len(t) - 1)]
    scores = []
    for k in range(0, len(samples), n):
        group = samples[k: k + n]
        for j, text in enumerate(group):
            scores.append(sacrebleu.sentence_bleu(text, group[:j] + group[j + 1:], tokenize="char").score)
    return {"distinct2": round(len(set(bigrams)) / max(len(bigrams), 1), 4),
            "self_bleu": round(statistics.fmean(scores), 3)}


def main() -> None:
    from benchmarks.quality.tasks import METRICS

    parser = argparse.ArgumentParser(description="Greedy-decode a student on a prompt/response JSONL and score it.")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="JSONL with prompt and response fields")
    parser.add_argument("--metric", choices=list(METRICS), required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()][: args.limit]
    model, tokenizer = load(args.model, args.device, args.dtype)
    outputs = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size)
    score = METRICS[args.metric](outputs, [r["response"] for r in rows])
    print(json.dumps({"model": str(args.model), "data": str(args.data), "rows": len(rows), args.metric: score}))


if __name__ == "__main__":
    main()
