"""SGLang's native scoring request and answer (`xkd.teacher.api: sglang`): its OpenAI /v1/completions ignores
`prompt_logprobs`, so the client asks /generate for the prompt's log-probs instead:

    POST {base_url}/generate
    {"input_ids": [[token ids], ...], "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
     "return_logprob": true, "logprob_start_len": 0, "top_logprobs_num": k}

The answer is a list with one output per prompt, in order. Output c's `meta_info` holds, per prompt token j,
`input_top_logprobs[j]`: None for token 0, then the top k as [log-prob, token id, text or None] in rank order (the
distribution of u_j given u_<j, as vLLM's entry j), and `input_token_logprobs[j]`: [log-prob, id, text] of u_j
itself (sglang/srt/managers/scheduler_output_processor_mixin.py, tokenizer_manager.py). SGLang writes JSON with
orjson, which sends -inf as null: a null log-prob is -inf here. With logprob_start_len 0 SGLang reuses no cached
prefix (`Req._compute_max_prefix_len`), so its radix cache cannot serve stale prompt log-probs.

Imports the standard library, numpy and `protocol` only.
"""

from __future__ import annotations

import math

import numpy as np

from axolotl_xkd.server.protocol import BadAnswer, Entry, Refused, topk_rows

GENERATE_PATH = "/generate"


def generate_request(sequences: list[list[int]], top_k: int) -> dict:
    """The body of a scoring request to SGLang's /generate: one prompt per sequence, one ignored generated token."""
    return {"input_ids": [list(s) for s in sequences], "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": top_k}


def parse_generate_answer(answer: object, sequences: list[list[int]], *, top_k: int, vocab_size: int,
                          prompt_token: bool) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """A /generate answer for `sequences` -> per sequence the (n, k) ids and log-probs of `protocol.topk_rows`
    ((n, k + 1) with `prompt_token`), and the number of entries dropped for ids at or above vocab_size."""
    if not isinstance(answer, list) or len(answer) != len(sequences) or not all(isinstance(o, dict) for o in answer):
        got = len(answer) if isinstance(answer, list) else "no list of"
        raise BadAnswer(f"/generate answered {got} outputs for {len(sequences)} prompts: {str(answer)[:120]}")
    rows, dropped = [], 0
    for index, (output, sequence) in enumerate(zip(answer, sequences)):
        positions = _positions(output.get("meta_info"), sequence, f"sequence {index}", prompt_token=prompt_token)
        ids, logprobs, out = topk_rows(positions, top_k=top_k, vocab_size=vocab_size,
                                       prompt=sequence if prompt_token else None,
                                       where=f"sequence {index}: meta_info.input_top_logprobs")
        rows.append((ids, logprobs))
        dropped += out
    return rows, dropped


def _positions(meta: object, sequence: list[int], where: str, *, prompt_token: bool) -> list[list[Entry]]:
    """One output's entries per prompt token: the top k in rank order, plus the prompt token itself (from
    input_token_logprobs, ranked after them) when `prompt_token` and it is not among them."""
    top = meta.get("input_top_logprobs") if isinstance(meta, dict) else None
    own = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
    if top is None or own is None:
        raise Refused(f"{where}: the answer's meta_info has no input_top_logprobs / input_token_logprobs, the "
                      "prompt's log-probs /generate returns with return_logprob and top_logprobs_num: this server's "
                      "/generate is not SGLang's. Check xkd.teacher.api (sglang for SGLang; vllm, the default, for "
                      "vLLM and `axolotl xkd serve-teacher`)")
    n = len(sequence)
    for name, values in (("input_top_logprobs", top), ("input_token_logprobs", own)):
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise BadAnswer(f"{where}: meta_info.{name} has {got} positions for a prompt of {n} tokens")
    positions: list[list[Entry]] = [[]]
    for j in range(1, n):
        try:
            entries = [(int(token), _logprob(value), rank) for rank, (value, token, *_) in enumerate(top[j], 1)]
            # The id SGLang reports for the prompt token is clipped for multimodal ids; the prompt itself is sent.
            if prompt_token and sequence[j] not in {token for token, _, _ in entries}:
                entries.append((sequence[j], _logprob(own[j][0]), len(entries) + 1))
        except (IndexError, TypeError, ValueError, OverflowError):
            raise BadAnswer(f"{where}: meta_info.input_top_logprobs[{j}] / input_token_logprobs[{j}] is not a list "
                            f"of [log-prob, token id, text]: {str(top[j])[:80]}") from None
        positions.append(entries)
    return positions


def _logprob(value: object) -> float:
    """A log-prob as SGLang sends it: a number, or null for -inf."""
    return -math.inf if value is None else float(value)
