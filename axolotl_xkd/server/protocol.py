"""The wire protocol between the server teacher's client and a teacher server: vLLM's completions API with its
`prompt_logprobs` extension, which `axolotl xkd serve-teacher` also speaks.

Each sequence is its own prompt; a request carries several:

    POST {base_url}/v1/completions
    {"model": M, "prompt": [[token ids], ...], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}

vLLM rejects max_tokens < 1 (vllm-project/vllm#9336), so one token is generated and ignored.
Choice c (by its "index") answers prompt c; its `prompt_logprobs` has one entry per prompt token: None for token
0, then {"<id>": {"logprob", "rank", "decoded_token"}} for token j, the distribution of u_j given u_<j: the top k
plus the prompt token itself when it ranks below k. This plugin's position i holds p_T(. | u_<=i), so position i
reads entry j = i + 1, and a sequence's last position has no entry.

`axolotl xkd serve-teacher` adds the `INFO_*` fields to its /v1/models card (vLLM has none of them).
Both halves live here: the client's (`completion_request`, `choices_of`, `parse_prompt_logprobs`) and the server's
(`prompt_logprobs_entry`, `completion_choice`, `completion_answer`, `error_answer`), so that what one writes and
the other reads are defined side by side. Imports the standard library, numpy and the top-k rule (`topk_rule`,
a leaf) only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from axolotl_xkd.topk_rule import topk_problem

# Model-card fields `axolotl xkd serve-teacher` adds to /v1/models.
INFO_TOKENIZER_HASH = "xkd_tokenizer_hash"  # frozen_teacher.tokenizer_hash of the served tokenizer
INFO_SPECIAL_TOKENS = "xkd_special_tokens"  # its BOS/EOS/PAD/UNK ids (a difference is only a warning)
INFO_VOCAB_SIZE = "xkd_vocab_size"
INFO_TOP_K_MAX = "xkd_top_k_max"
# vLLM sends -9999.0 where a log-prob is -inf (JSON has no infinity).
LOGPROB_FLOOR = -9999.0


class BadAnswer(ValueError):
    """An answer that does not follow the protocol (a later attempt may get a good one)."""


def completion_request(model: str | None, sequences: list[list[int]], top_k: int) -> dict:
    """The body of a scoring request: one prompt per sequence, one ignored generated token."""
    return {"model": model, "prompt": [list(s) for s in sequences], "max_tokens": 1, "temperature": 1.0,
            "prompt_logprobs": top_k}


def choices_of(answer: object, count: int) -> list[dict]:
    """The answer's choices in prompt order; BadAnswer unless there is exactly one per prompt."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != count or not all(isinstance(c, dict) for c in choices):
        got = len(choices) if isinstance(choices, list) else "no"
        raise BadAnswer(f"the answer has {got} choices for {count} prompts: {str(answer)[:120]}")
    return sorted(choices, key=lambda c: c.get("index", 0))


def parse_prompt_logprobs(choice: dict, n: int, *, top_k: int, vocab_size: int,
                          prompt: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One choice of a completions answer for an n-token prompt -> (n, k) int64 ids, float32 log-probs
    (decreasing), aligned with the student (row i <- entry i + 1; row n-1 -inf). Each position's top k must follow
    the one top-k rule (`axolotl_xkd.topk_rule`; log-probs up to its rounding tolerance above 0 are accepted, then
    clamped to 0). BadAnswer names the sequence (the choice's index), the entry and what is wrong.

    Given the `prompt` itself, (n, k + 1): column k holds the prompt's next token u_{i+1} with the log-prob the
    entry sends for it when it ranks below k (vLLM and serve-teacher always send it), -inf otherwise."""
    sequence = f"sequence {choice.get('index', 0)}"
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise BadAnswer(f"{sequence}: prompt_logprobs has {got} positions for a prompt of {n} tokens")
    width = top_k + (prompt is not None)
    ids = np.zeros((n, width), dtype=np.int64)
    logprobs = np.full((n, width), -np.inf, dtype=np.float32)
    for j in range(1, n):
        entry = entries[j]
        if not isinstance(entry, dict) or len(entry) < top_k:
            raise BadAnswer(f"{sequence}: prompt_logprobs[{j}] holds "
                            f"{len(entry) if isinstance(entry, dict) else entry!r} entries, expected at least "
                            f"top_k={top_k}")
        try:
            pairs = [(int(token), float(value["logprob"] if isinstance(value, dict) else value))
                     for token, value in entry.items()]
            pairs.sort(key=lambda pair: -pair[1])
            ids[j - 1, :top_k] = [token for token, _ in pairs[:top_k]]
        except (KeyError, TypeError, ValueError, OverflowError):
            raise BadAnswer(f"{sequence}: prompt_logprobs[{j}] is not a map of token id -> {{logprob}}: "
                            f"{str(entry)[:80]}") from None
        logprobs[j - 1, :top_k] = [value for _, value in pairs[:top_k]]
        below = prompt is not None and [pair for pair in pairs[top_k:] if pair[0] == prompt[j]]
        if below:
            ids[j - 1, top_k], logprobs[j - 1, top_k] = below[0]
    problem = topk_problem(ids, logprobs, vocab_size=vocab_size)
    if problem is not None:
        raise BadAnswer(f"{sequence}: prompt_logprobs[{problem.position + 1}] has {problem.what}")
    return ids, np.minimum(logprobs, 0.0)


# -- the server's half: building the answers ------------------------------------------------------------------------
def _logprob(value: float, rank: int, decoded: str) -> dict:
    return {"logprob": value if math.isfinite(value) else LOGPROB_FLOOR, "rank": rank, "decoded_token": decoded}


def prompt_logprobs_entry(top: Sequence[tuple[int, float]], token: int, value: float, rank: int,
                          decoded: Sequence[str]) -> dict:
    """One position's entry of `prompt_logprobs`: the top k (token id, log-prob) in rank order, plus the prompt
    token itself (its log-prob and rank) when it is not among them, as vLLM answers. `decoded[id]` is the token's
    text; a log-prob of -inf is sent as LOGPROB_FLOOR (JSON has no infinity)."""
    entry = {str(t): _logprob(v, r, decoded[t]) for r, (t, v) in enumerate(top, start=1)}
    if str(token) not in entry:
        entry[str(token)] = _logprob(value, rank, decoded[token])
    return entry


def completion_choice(index: int, next_id: int, text: str, entries: list[dict] | None) -> dict:
    """Choice `index` of a completions answer: the one generated token, and the prompt's entries (None for
    token 0, then one per prompt token) or None when the request asked for no prompt_logprobs."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
            "token_ids": [next_id], "prompt_logprobs": None if entries is None else [None, *entries]}


def completion_answer(model: str, choices: list[dict], prompt_tokens: int) -> dict:
    """The completions answer: one choice per prompt, one generated token each."""
    return {
        "id": f"cmpl-{time.time_ns():x}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(choices),
                  "total_tokens": prompt_tokens + len(choices)},
    }


# OpenAI's error types by status, as vLLM's server names them.
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 411: "BadRequestError",
                413: "BadRequestError", 500: "InternalServerError"}


def error_answer(status: int, message: str) -> dict:
    """An OpenAI-style error body (the client shows its message)."""
    return {"object": "error", "message": message, "type": _ERROR_TYPES.get(status, "BadRequestError"),
            "code": status}
