"""The wire protocol between the server teacher's client and a teacher server: vLLM's completions API with its
`prompt_logprobs` extension, which `axolotl xkd serve-teacher` also speaks.

Each sequence is its own prompt; a request carries several:

    POST {base_url}/v1/completions
    {"model": M, "prompt": [[token ids], ...], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}

vLLM rejects max_tokens < 1 (vllm-project/vllm#9336), so one token is generated and ignored.
Choice c (by its "index") answers prompt c; its `prompt_logprobs` has one entry per prompt token: None for token
0, then {"<id>": {"logprob", "rank", "decoded_token"}} for token j, the distribution of u_j given u_<j: the prompt
token u_j first, at its rank in the whole vocabulary, then the top k at ranks 1..k (u_j once when it is among them;
vLLM's `append_logprobs_for_next_position`). This plugin's position i holds p_T(. | u_<=i), so position i reads
entry j = i + 1, and a sequence's last position has no entry. SGLang's native /generate answers the same
distributions in another layout (`sglang.py`); both become top-k rows through `topk_rows`.

Ids at or above the tokenizer's length: vLLM computes log-probs over the model's config.vocab_size, often padded
beyond the tokenizer, so such ids can appear among the top k. They are dropped (their mass joins the tail) and
counted, unless one carries more than OUT_OF_VOCAB_MASS, which means the model and tokenizer do not belong
together (`Refused`).

`axolotl xkd serve-teacher` adds the `INFO_*` fields to its /v1/models card (vLLM has none of them).
Both halves live here: the client's (`completion_request`, `parse_completion_answer`, `topk_rows`) and the server's
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
# vLLM sends -9999.0 where a log-prob is -inf (JSON has no infinity); the client reads it back as -inf.
LOGPROB_FLOOR = -9999.0
OUT_OF_VOCAB_MASS = 1e-3
"""The most probability an id at or above the tokenizer's length may carry before the answer is refused: a padded
vocabulary row is an untrained output whose probability is far below this (typically < 1e-8)."""

Entry = tuple[int, float, int | None]
"""One (token id, log-prob, rank or None) of a position's answer."""


class BadAnswer(ValueError):
    """An answer that does not follow the protocol (a later attempt may get a good one)."""


class Refused(ValueError):
    """An answer that no retry will change: the server cannot serve this configuration (the message says why and
    what to change)."""


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


def parse_completion_answer(answer: object, sequences: list[list[int]], *, top_k: int, vocab_size: int,
                            prompt_token: bool) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """A completions answer for `sequences` -> per sequence (`parse_prompt_logprobs`), and the number of entries
    dropped for ids at or above vocab_size."""
    rows, dropped = [], 0
    for choice, sequence in zip(choices_of(answer, len(sequences)), sequences):
        ids, logprobs, out = parse_prompt_logprobs(choice, len(sequence), top_k=top_k, vocab_size=vocab_size,
                                                   prompt=sequence if prompt_token else None)
        rows.append((ids, logprobs))
        dropped += out
    return rows, dropped


def parse_prompt_logprobs(choice: dict, n: int, *, top_k: int, vocab_size: int,
                          prompt: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """One choice of a completions answer for an n-token prompt -> `topk_rows` of its `prompt_logprobs`. Refused
    when the choice has none: the server ignores the request's prompt_logprobs (SGLang's /v1/completions does)."""
    sequence = f"sequence {choice.get('index', 0)}"
    entries = choice.get("prompt_logprobs")
    if entries is None:
        raise Refused(f"{sequence}: the answer has no prompt_logprobs: this server ignores the request's "
                      "prompt_logprobs (SGLang's /v1/completions does). For an SGLang server set xkd.teacher.api: "
                      "sglang (its native /generate returns the prompt's log-probs); otherwise serve the teacher "
                      "with vLLM or `axolotl xkd serve-teacher`")
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise BadAnswer(f"{sequence}: prompt_logprobs has {got} positions for a prompt of {n} tokens")
    positions: list[list[Entry]] = [[]]
    for j in range(1, n):
        entry = entries[j]
        try:
            positions.append([(int(token), float(value["logprob"] if isinstance(value, dict) else value),
                               value.get("rank") if isinstance(value, dict) else None)
                              for token, value in entry.items()])
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
            raise BadAnswer(f"{sequence}: prompt_logprobs[{j}] is not a map of token id -> {{logprob, rank}}: "
                            f"{str(entry)[:80]}") from None
    return topk_rows(positions, top_k=top_k, vocab_size=vocab_size, prompt=prompt,
                     where=f"{sequence}: prompt_logprobs")


def topk_rows(positions: Sequence[Sequence[Entry]], *, top_k: int, vocab_size: int, prompt: Sequence[int] | None,
              where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The entries of an n-token prompt (positions[j]: the distribution of u_j given u_<j; positions[0] unused) ->
    (n, k) int64 ids, float32 log-probs (decreasing), aligned with the student (row i <- position i + 1; row n-1
    -inf), and how many entries were dropped for ids at or above vocab_size (module docstring; Refused above
    OUT_OF_VOCAB_MASS). Log-probs at LOGPROB_FLOOR or below are -inf (padding). Each row must then follow the one
    top-k rule (`axolotl_xkd.topk_rule`; log-probs up to its rounding tolerance above 0 are clamped to 0);
    BadAnswer names `where`, the position and what is wrong.

    Given the `prompt` itself, (n, k + 1): column k holds the prompt's next token u_{i+1} with the log-prob the
    position sends for it when it ranks below k, -inf otherwise."""
    n = len(positions)
    ids = np.zeros((n, top_k + (prompt is not None)), dtype=np.int64)
    logprobs = np.full(ids.shape, -np.inf, dtype=np.float32)
    dropped = 0
    for j in range(1, n):
        entries = positions[j]
        if len(entries) < top_k:
            raise BadAnswer(f"{where}[{j}] holds {len(entries)} entries, expected at least top_k={top_k}")
        # By log-prob, ties by rank: the prompt token sent beside the top k ranks below the k-th on a tie.
        ranked = sorted(entries, key=lambda e: (-e[1], e[2] if isinstance(e[2], int) else math.inf))
        kept = []
        for token, value, _ in ranked[:top_k]:
            if token < vocab_size or not value > LOGPROB_FLOOR:
                kept.append((token, value))
            elif value > math.log(OUT_OF_VOCAB_MASS):
                raise Refused(f"{where}[{j}] has a token id outside the vocabulary [0, {vocab_size}) with "
                              f"probability {math.exp(min(value, 0.0)):.3g} (id {token}; a padded vocabulary row "
                              f"carries under {OUT_OF_VOCAB_MASS:g}): the served model's output layer does not "
                              "belong to this tokenizer. Serve the model with its own tokenizer (vLLM: --tokenizer), "
                              "and check that the tokenizer the client checks is the served one")
            else:
                dropped += 1
        if kept:
            ids[j - 1, : len(kept)], logprobs[j - 1, : len(kept)] = zip(*kept)
        below = prompt is not None and [e for e in ranked[top_k:] if e[0] == prompt[j]]
        if below:
            ids[j - 1, top_k], logprobs[j - 1, top_k] = below[0][:2]
    logprobs[logprobs <= LOGPROB_FLOOR] = -np.inf
    problem = topk_problem(ids, logprobs, vocab_size=vocab_size)
    if problem is not None:
        raise BadAnswer(f"{where}[{problem.position + 1}] has {problem.what}")
    return ids, np.minimum(logprobs, 0.0), dropped


# -- the server's half: building the answers ------------------------------------------------------------------------
def _logprob(value: float, rank: int, decoded: str) -> dict:
    return {"logprob": value if math.isfinite(value) else LOGPROB_FLOOR, "rank": rank, "decoded_token": decoded}


def prompt_logprobs_entry(top: Sequence[tuple[int, float]], token: int, value: float, rank: int,
                          decoded: Sequence[str]) -> dict:
    """One position's entry of `prompt_logprobs` as vLLM writes it: the prompt token first (its log-prob and rank),
    then the top k (token id, log-prob) in rank order, the prompt token's entry replaced by its top-k one when it is
    among them. `decoded[id]` is the token's text; a log-prob of -inf is sent as LOGPROB_FLOOR (JSON has no
    infinity)."""
    entry = {str(token): _logprob(value, rank, decoded[token])}
    entry.update({str(t): _logprob(v, r, decoded[t]) for r, (t, v) in enumerate(top, start=1)})
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
