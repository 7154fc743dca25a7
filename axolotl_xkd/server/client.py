"""The server teacher (`xkd.teacher.source: server`): top-k log-probs from an OpenAI-compatible server.

The protocol is vLLM's completions API with its `prompt_logprobs` extension, which
`axolotl xkd serve-teacher` also speaks. Each sequence (each packed segment, never one prompt across
segments) is its own prompt; a request carries the prompts of up to `request_tokens` tokens:

    POST {base_url}/v1/completions
    {"model": M, "prompt": [[token ids], ...], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}

vLLM rejects max_tokens < 1 (vllm-project/vllm#9336), so one token is generated and ignored.
Choice c (by its "index") answers prompt c; its `prompt_logprobs` has one entry per prompt token: None for token 0, then
{"<id>": {"logprob", "rank", "decoded_token"}} for token j, the distribution of u_j given u_<j: the
top k plus the prompt token itself when it ranks below k. This plugin's position i holds
p_T(. | u_<=i), so position i reads entry j = i + 1, and a sequence's last position has no entry.

Requests go to a thread pool as soon as a batch is drawn (`prefetched`), several batches ahead of its
step; `get_signal` waits for the answers. Failures are retried with exponential backoff, then stop the
run with TeacherServerError: a batch is never trained with a missing teacher target.
Imports the standard library, numpy and torch; nothing of transformers, Axolotl or the trainer.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from axolotl_xkd.losses.signal import TopKSignal
from axolotl_xkd.sequences import segments

LOG = logging.getLogger(__name__)

# Batch key holding the id of a batch's pending requests (a plain int: the trainer moves no such value).
TICKET = "xkd_teacher_ticket"
IGNORE_INDEX = -100
# Model-info fields `axolotl xkd serve-teacher` adds to /v1/models (vLLM has none of them).
INFO_TOKENIZER_HASH = "xkd_tokenizer_hash"
INFO_VOCAB_SIZE = "xkd_vocab_size"
INFO_TOP_K_MAX = "xkd_top_k_max"
_READ_CHUNK = 1 << 16
_ERROR_BODY_CHARS = 300


class TeacherServerError(RuntimeError):
    """The teacher server failed beyond the configured retries (or cannot serve this student)."""


class _Retryable(Exception):
    """One attempt failed in a way a later attempt may not: no connection, timeout, 5xx, bad answer."""


class _Fatal(Exception):
    """The server refused the request itself (4xx): retrying would get the same answer."""


@dataclass(frozen=True)
class ServerSettings:
    """The client's settings (the validated `xkd.teacher` block, the API key resolved from the environment)."""

    base_url: str
    top_k: int
    timeout_s: float = 120.0
    max_retries: int = 3
    retry_backoff_s: float = 0.5
    concurrency: int = 8
    prefetch: int = 2
    request_tokens: int = 8192
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)


class TeacherServerClient:
    """HTTP client of one teacher server: model info check at start, then scoring requests with retries."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        self.model = settings.model
        self.vocab_size: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="xkd-teacher")
        # No proxy from the environment: the teacher is a known host, often loopback.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- one HTTP exchange --------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        return headers

    def _exchange(self, method: str, path: str, payload: dict | None) -> object:
        """One attempt: the decoded JSON answer, or _Retryable / _Fatal. Bounded by timeout_s in all."""
        timeout = self.settings.timeout_s
        deadline = time.monotonic() + timeout
        body = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base_url + path, data=body, headers=self._headers(), method=method)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                chunks = []
                while chunk := response.read(_READ_CHUNK):
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise _Retryable(f"the answer took longer than timeout_s={timeout}s")
                raw = b"".join(chunks)
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit() and len(raw) != int(length):
                    raise _Retryable(f"truncated answer: the connection closed after {len(raw)} of {length} bytes")
        except urllib.error.HTTPError as error:
            detail = error.read(_ERROR_BODY_CHARS).decode(errors="replace")
            kind = _Retryable if error.code >= 500 or error.code == 429 else _Fatal
            raise kind(f"HTTP {error.code} {error.reason}: {detail}") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise _Retryable(f"no answer within timeout_s={timeout}s") from None
            raise _Retryable(f"cannot connect ({error.reason})") from None
        except TimeoutError:
            raise _Retryable(f"no answer within timeout_s={timeout}s") from None
        except (http.client.HTTPException, OSError) as error:
            raise _Retryable(f"connection broken ({type(error).__name__}: {error})") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _Retryable(f"malformed JSON ({error}) in {len(raw)} bytes: {raw[:80]!r}") from None

    def _with_retries(self, what: str, attempt: Callable[[], object]) -> object:
        """Run `attempt` up to 1 + max_retries times, backing off exponentially; then TeacherServerError."""
        tries = self.settings.max_retries + 1
        for n in range(tries):
            try:
                return attempt()
            except _Fatal as error:
                raise TeacherServerError(self._message(what, n + 1, str(error), fatal=True)) from None
            except _Retryable as error:
                if n + 1 == tries:
                    raise TeacherServerError(self._message(what, tries, str(error))) from None
                LOG.warning("xkd teacher server %s: %s failed (%s); retry %d of %d",
                            self.base_url, what, error, n + 1, tries - 1)
                time.sleep(self.settings.retry_backoff_s * 2**n)
        raise AssertionError("unreachable")

    def _message(self, what: str, attempts: int, cause: str, *, fatal: bool = False) -> str:
        advice = (
            "the server refused the request; check xkd.teacher (top_k within the server's --max-logprobs, model "
            "name, api_key_env) and the server's log"
            if fatal else
            "check that the server is running and reachable (vLLM: `vllm serve MODEL --max-logprobs K`; or "
            "`axolotl xkd serve-teacher --model PATH`), or raise xkd.teacher.timeout_s / max_retries"
        )
        return (f"xkd.teacher.base_url={self.base_url}: {what} failed after {attempts} attempt(s): {cause}. "
                f"No batch is trained without its teacher targets; {advice}.")

    # -- start-up check ------------------------------------------------------------------------------
    def check_server(self, tokenizer, tokenizer_hash: str) -> None:
        """Read /v1/models once: pick the model, and refuse a server whose tokenizer is not the student's.

        `axolotl xkd serve-teacher` publishes a tokenizer fingerprint (compared with `tokenizer_hash`);
        for a server without one (vLLM), a probe text is tokenized by both through /tokenize.
        """
        def attempt() -> dict:
            info = self._exchange("GET", "/v1/models", None)
            models = info.get("data") if isinstance(info, dict) else None
            if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
                raise _Retryable(f"/v1/models answered without a model list: {str(info)[:120]}")
            return info

        models = self._with_retries("GET /v1/models", attempt)["data"]
        names = [m.get("id") for m in models]
        if self.model is None:
            self.model = names[0]
        elif self.model not in names:
            raise TeacherServerError(f"xkd.teacher.base_url={self.base_url}: serves {names}, not xkd.teacher.model="
                                     f"{self.model!r}; set xkd.teacher.model to one of them.")
        entry = models[names.index(self.model)]
        vocab_size = len(tokenizer)
        if INFO_TOKENIZER_HASH in entry:
            theirs = entry[INFO_TOKENIZER_HASH]
            if theirs != tokenizer_hash or entry.get(INFO_VOCAB_SIZE, vocab_size) != vocab_size:
                raise TeacherServerError(
                    f"xkd.teacher.base_url={self.base_url}: model {self.model!r} uses another tokenizer (fingerprint "
                    f"{str(theirs)[:12]}..., {entry.get(INFO_VOCAB_SIZE)} tokens) than the student "
                    f"({tokenizer_hash[:12]}..., {vocab_size} tokens). X-KD compares distributions token id by token "
                    "id, so both must use the same tokenizer: serve a teacher with the student's tokenizer.")
        else:
            self._probe_tokenizer(tokenizer)
        if self.settings.top_k > vocab_size:
            raise ValueError(f"xkd.teacher.top_k={self.settings.top_k} exceeds the vocabulary ({vocab_size} tokens)")
        limit = entry.get(INFO_TOP_K_MAX)
        if limit is not None and self.settings.top_k > limit:
            raise TeacherServerError(f"xkd.teacher.base_url={self.base_url}: serves at most {limit} log-probs per "
                                     f"position, xkd.teacher.top_k is {self.settings.top_k}; lower top_k or restart "
                                     f"the server with --top-k-max {self.settings.top_k}.")
        self.vocab_size = vocab_size  # marks the server as checked
        LOG.info("xkd teacher server %s: model %r, top_k %d", self.base_url, self.model, self.settings.top_k)

    def _probe_tokenizer(self, tokenizer) -> None:
        """Servers without a fingerprint: compare how both tokenize the same text (vLLM's /tokenize)."""
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(min(len(tokenizer), 4096)) if i not in special]
        text = tokenizer.decode(ids[:: max(1, len(ids) // 512)])
        payload = {"model": self.model, "prompt": text, "add_special_tokens": False}
        try:
            answer = self._exchange("POST", "/tokenize", payload)
        except (_Retryable, _Fatal) as error:
            LOG.warning("xkd teacher server %s publishes no tokenizer fingerprint and /tokenize failed (%s): the "
                        "teacher's tokenizer is NOT checked against the student's", self.base_url, error)
            return
        ours = tokenizer.encode(text, add_special_tokens=False)
        theirs = answer.get("tokens") if isinstance(answer, dict) else None
        if theirs != ours:
            theirs = theirs or []
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise TeacherServerError(
                f"xkd.teacher.base_url={self.base_url}: model {self.model!r} tokenizes a probe text differently from "
                f"the student (first difference at token {first}); it uses another tokenizer. X-KD compares "
                "distributions token id by token id: serve a teacher with the student's tokenizer.")

    # -- scoring -------------------------------------------------------------------------------------
    def score(self, sequences: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence of n tokens, (n, k) ids and log-probs: row i is p_T(. | u_<=i), row n-1 is empty (-inf).

        One request with one prompt per sequence (vLLM answers a list of token-id prompts with one choice each).
        """
        if self.vocab_size is None:
            raise RuntimeError("TeacherServerClient.check_server must run before score")
        payload = {"model": self.model, "prompt": [list(s) for s in sequences], "max_tokens": 1,
                   "temperature": 1.0, "prompt_logprobs": self.settings.top_k}

        def attempt() -> list[tuple[np.ndarray, np.ndarray]]:
            choices = _choices(self._exchange("POST", "/v1/completions", payload), len(sequences))
            return [parse_prompt_logprobs(c, len(s), top_k=self.settings.top_k, vocab_size=self.vocab_size)
                    for c, s in zip(choices, sequences)]

        tokens = sum(len(s) for s in sequences)
        return self._with_retries(f"POST /v1/completions ({len(sequences)} sequences, {tokens} tokens)", attempt)

    def submit(self, sequences: list[list[int]]) -> Future:
        """`score` in the thread pool."""
        return self._pool.submit(self.score, sequences)

    def close(self) -> None:
        """Drop queued requests; requests in flight end within their timeout."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _choices(answer: object, count: int) -> list[dict]:
    """The answer's choices in prompt order; _Retryable unless there is exactly one per prompt."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != count or not all(isinstance(c, dict) for c in choices):
        got = len(choices) if isinstance(choices, list) else "no"
        raise _Retryable(f"the answer has {got} choices for {count} prompts: {str(answer)[:120]}")
    return sorted(choices, key=lambda c: c.get("index", 0))


def parse_prompt_logprobs(choice: dict, n: int, *, top_k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One choice of a completions answer for an n-token prompt -> (n, k) int64 ids, float32 log-probs
    (decreasing), aligned with the student (row i <- entry i + 1; row n-1 -inf). _Retryable names what is wrong."""
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise _Retryable(f"prompt_logprobs has {got} positions for a prompt of {n} tokens")
    ids = np.zeros((n, top_k), dtype=np.int64)
    logprobs = np.full((n, top_k), -np.inf, dtype=np.float32)
    for j in range(1, n):
        entry = entries[j]
        if not isinstance(entry, dict) or len(entry) < top_k:
            raise _Retryable(f"prompt_logprobs[{j}] holds {len(entry) if isinstance(entry, dict) else entry!r} "
                             f"entries, expected at least top_k={top_k}")
        try:
            pairs = [(int(token), float(value["logprob"] if isinstance(value, dict) else value))
                     for token, value in entry.items()]
        except (KeyError, TypeError, ValueError):
            raise _Retryable(f"prompt_logprobs[{j}] is not a map of token id -> {{logprob}}: {str(entry)[:80]}") \
                from None
        pairs.sort(key=lambda pair: -pair[1])
        top = pairs[:top_k]
        if any(not 0 <= token < vocab_size for token, _ in top):
            raise _Retryable(f"prompt_logprobs[{j}] has a token id outside the vocabulary [0, {vocab_size})")
        if any(math.isnan(value) or value > 1e-4 for _, value in top):
            raise _Retryable(f"prompt_logprobs[{j}] has a log-prob that is NaN or above 0")
        ids[j - 1] = [token for token, _ in top]
        logprobs[j - 1] = [min(value, 0.0) for _, value in top]
    return ids, logprobs


class ServerTeacherSource:
    """Turns batches into teacher top-k signals by asking a teacher server, several batches ahead."""

    def __init__(self, client: TeacherServerClient) -> None:
        self.client = client
        self.top_k = client.settings.top_k
        self._pending: dict[int, list[tuple[Future, list[tuple[int, int, int]]]]] = {}
        self._tickets = itertools.count()
        self._lock = threading.Lock()
        self._lookahead: _Lookahead | None = None

    def submit(self, batch: dict[str, Tensor]) -> None:
        """Send the requests for every sequence of `batch` and tag it with their ticket (once per batch).

        Each sequence (packed segment) is its own prompt; prompts are grouped into requests of at most
        `request_tokens` tokens, so a batch costs a few HTTP round trips rather than one per sequence.
        """
        if TICKET in batch:
            return
        input_ids = batch["input_ids"].cpu().numpy()
        labels = batch.get("labels")
        labels = None if labels is None else labels.cpu().numpy()
        budget = self.client.settings.request_tokens
        work: list[tuple[Future, list[tuple[int, int, int]]]] = []
        group: list[tuple[int, int, int]] = []
        for b, start, end in segments(batch):
            # A sequence with no response token needs no teacher (its positions are not trained).
            if end - start < 2 or (labels is not None and not (labels[b, start + 1:end] != IGNORE_INDEX).any()):
                continue
            if group and sum(e - s for _, s, e in group) + end - start > budget:
                work.append((self.client.submit([input_ids[g, s:e].tolist() for g, s, e in group]), group))
                group = []
            group.append((b, start, end))
        if group:
            work.append((self.client.submit([input_ids[g, s:e].tolist() for g, s, e in group]), group))
        with self._lock:
            ticket = next(self._tickets)
            self._pending[ticket] = work
        batch[TICKET] = ticket

    def prefetched(self, batches: Iterator) -> Iterator:
        """`batches`, with each batch's requests sent `prefetch` batches before it is handed out.

        The trainer calls this with the same epoch iterator at every step; the lookahead is kept for it.
        """
        if self._lookahead is None or self._lookahead.source is not batches:
            self._lookahead = _Lookahead(batches, self.client.settings.prefetch, self.submit)
        return self._lookahead

    def get_signal(self, batch: dict[str, Tensor]) -> TopKSignal:
        """TopKSignal (B, T, k) aligned with the student; -inf where a position has no teacher entry."""
        if TICKET not in batch:
            self.submit(batch)  # not drawn through `prefetched` (evaluation): ask now
        with self._lock:
            work = self._pending.pop(batch[TICKET])
        shape = (*batch["input_ids"].shape, self.top_k)
        ids = torch.zeros(shape, dtype=torch.long)
        logprobs = torch.full(shape, -torch.inf, dtype=torch.float32)
        try:
            for future, group in work:
                for (b, start, end), (row_ids, row_logprobs) in zip(group, future.result()):
                    ids[b, start:end] = torch.from_numpy(row_ids)
                    logprobs[b, start:end] = torch.from_numpy(row_logprobs)
        except BaseException:
            self.close()
            raise
        device = batch["input_ids"].device
        return TopKSignal(token_ids=ids.to(device), logprobs=logprobs.to(device))

    def close(self) -> None:
        """Cancel every queued request (after a failure, the run stops)."""
        with self._lock:
            self._pending.clear()
        self.client.close()


class _Lookahead:
    """An iterator that draws `depth` items ahead of the one it hands out, calling `on_draw` on each."""

    def __init__(self, source: Iterator, depth: int, on_draw: Callable[[dict], None]) -> None:
        self.source = source
        self.depth = depth
        self.on_draw = on_draw
        self._queue: deque = deque()
        self._done = False

    def __iter__(self) -> _Lookahead:
        return self

    def __next__(self):
        while not self._done and len(self._queue) <= self.depth:
            try:
                item = next(self.source)
            except StopIteration:
                self._done = True
                break
            self.on_draw(item)
            self._queue.append(item)
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()
