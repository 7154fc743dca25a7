"""The HTTP client of a teacher server (vLLM's `vllm serve`, `axolotl xkd serve-teacher`, or SGLang with
`xkd.teacher.api: sglang`): the start-up check (model name, server kind, same-tokenizer rule, top-k limit), then
scoring requests with an explicit timeout, retries with exponential backoff and a thread pool. The wire formats are
in `protocol.py` (vLLM's completions) and `sglang.py` (SGLang's /generate); turning batches into teacher signals is
`teachers/server.py`'s job.

Imports the standard library, numpy and the config schema (args); nothing of torch, transformers, Axolotl or
the trainer.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from axolotl_xkd.args import ServerTeacher
from axolotl_xkd.frozen_teacher import special_tokens, warn_other_special_tokens
from axolotl_xkd.server.protocol import (
    INFO_SPECIAL_TOKENS,
    INFO_TOKENIZER_HASH,
    INFO_TOP_K_MAX,
    INFO_VOCAB_SIZE,
    OUT_OF_VOCAB_MASS,
    BadAnswer,
    Refused,
    completion_request,
    parse_completion_answer,
)
from axolotl_xkd.server.sglang import GENERATE_PATH, generate_request, parse_generate_answer

LOG = logging.getLogger(__name__)

_READ_CHUNK = 1 << 16
_ERROR_BODY_CHARS = 300


class TeacherServerError(RuntimeError):
    """The teacher server failed beyond the configured retries (or cannot serve this student)."""


class _Retryable(Exception):
    """One attempt failed in a way a later attempt may not: no connection, timeout, 5xx, bad answer."""


class _Fatal(Exception):
    """The server refused the request itself (4xx, or a `protocol.Refused` answer): retrying would get the same
    answer. `advice` replaces the generic one when the cause says what to change."""

    def __init__(self, message: str, advice: str | None = None) -> None:
        super().__init__(message)
        self.advice = advice


# What the /v1/models card's owned_by says of a server, and the xkd.teacher.api that scores with it.
_OWNER_API = {"vllm": "vllm", "axolotl_xkd": "vllm", "sglang": "sglang"}


class TeacherServerClient:
    """HTTP client of one teacher server: model info check at start, then scoring requests with retries."""

    def __init__(self, settings: ServerTeacher, *, api_key: str | None = None) -> None:
        self.settings = settings  # the validated `xkd.teacher` block (source: server)
        self.api_key = api_key
        self.base_url = settings.base_url.rstrip("/")
        self.model = settings.model
        self.vocab_size: int | None = None
        self.out_of_vocabulary = 0  # entries dropped for ids at or above the tokenizer's length (protocol.topk_rows)
        self._count_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="xkd-teacher")
        # No proxy from the environment: the teacher is a known host, often loopback.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- one HTTP exchange --------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
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
        began = time.monotonic()
        for n in range(tries):
            try:
                return attempt()
            except _Fatal as error:
                raise TeacherServerError(self._message(what, n + 1, str(error), fatal=True,
                                                       advice=error.advice)) from None
            except _Retryable as error:
                if n + 1 == tries:
                    raise TeacherServerError(self._message(what, tries, str(error),
                                                           seconds=time.monotonic() - began)) from None
                LOG.warning("xkd teacher server %s: %s failed (%s); retry %d of %d",
                            self.base_url, what, error, n + 1, tries - 1)
                time.sleep(self.settings.retry_backoff_s * 2**n)
        raise AssertionError("unreachable")

    def _message(self, what: str, attempts: int, cause: str, *, fatal: bool = False, seconds: float = 0.0,
                 advice: str | None = None) -> str:
        settings = self.settings
        if fatal:
            advice = advice or ("the server refused the request; check xkd.teacher (top_k within the server's "
                                "--max-logprobs, model name, api_key_env) and the server's log")
            budget = ""
        else:
            waits = settings.retry_backoff_s * (2 ** settings.max_retries - 1)
            advice = ("check that the server is running and reachable (vLLM: `vllm serve MODEL --max-logprobs K`; or "
                      "`axolotl xkd serve-teacher --model PATH`), or raise xkd.teacher.timeout_s / max_retries / "
                      "retry_backoff_s")
            budget = (f" over {seconds:.1f}s (the retry budget: xkd.teacher.max_retries={settings.max_retries}, "
                      f"retry_backoff_s={settings.retry_backoff_s:g} doubling, {waits:g}s of waits; "
                      f"timeout_s={settings.timeout_s:g} per attempt)")
        return (f"xkd.teacher.base_url={self.base_url}: {what} failed after {attempts} attempt(s){budget}: {cause}. "
                f"No batch is trained without its teacher targets; {advice}.")

    # -- start-up check ------------------------------------------------------------------------------
    def check_server(self, tokenizer, tokenizer_hash: str) -> None:
        """Read /v1/models once: pick the model, and refuse a server whose tokenizer is not `tokenizer`: the
        student's, or with `cross_tokenizer` the teacher's named by xkd.teacher.tokenizer_path (the prompts are its
        ids).

        The same-tokenizer rule (frozen_teacher): `axolotl xkd serve-teacher` publishes its tokenizer's fingerprint
        (compared with `tokenizer_hash`) and special tokens (a difference is a warning). A server without them
        (vLLM) can only be checked on a sample: a probe text is tokenized by both through /tokenize.
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
        self._check_kind(entry)
        vocab_size = len(tokenizer)
        if INFO_TOKENIZER_HASH in entry:
            theirs = entry[INFO_TOKENIZER_HASH]
            if theirs != tokenizer_hash or entry.get(INFO_VOCAB_SIZE, vocab_size) != vocab_size:
                raise TeacherServerError(
                    f"xkd.teacher.base_url={self.base_url}: model {self.model!r} uses another tokenizer (fingerprint "
                    f"{str(theirs)[:12]}..., {entry.get(INFO_VOCAB_SIZE)} tokens) than {self._whose()} "
                    f"({tokenizer_hash[:12]}..., {vocab_size} tokens). {self._advice()}")
            warn_other_special_tokens(special_tokens(tokenizer), entry.get(INFO_SPECIAL_TOKENS) or {},
                                      f"xkd.teacher.base_url={self.base_url} (model {self.model!r})")
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

    def _check_kind(self, card: dict) -> None:
        """Refuse a server whose model card names another kind than xkd.teacher.api scores (SGLang's /v1/completions
        ignores prompt_logprobs; vLLM has no /generate). A card without a known owned_by (a router) passes."""
        wanted = _OWNER_API.get(card.get("owned_by"))
        if wanted is not None and wanted != self.settings.api:
            owner = card.get("owned_by")
            raise TeacherServerError(
                f"xkd.teacher.base_url={self.base_url}: model {self.model!r} is served by {owner} (its /v1/models card "
                f"says owned_by {owner!r}), which xkd.teacher.api={self.settings.api!r} cannot score with: set "
                f"xkd.teacher.api: {wanted} (docs/teachers.md#teacher-server).")

    def _probe_tokenizer(self, tokenizer) -> None:
        """Servers without a fingerprint: compare how both tokenize the same text (vLLM's and SGLang's /tokenize)."""
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
                f"{self._whose()} (first difference at token {first}); it uses another tokenizer. {self._advice()}")

    def _whose(self) -> str:
        """The tokenizer the server must use, as errors name it."""
        if self.settings.cross_tokenizer:
            return f"xkd.teacher.tokenizer_path={self.settings.tokenizer_path!r}"
        return "the student"

    def _advice(self) -> str:
        """What to do about a server of another tokenizer than `_whose`."""
        if self.settings.cross_tokenizer:
            return ("With xkd.teacher.cross_tokenizer the student's text is re-tokenized with "
                    "xkd.teacher.tokenizer_path and sent as token ids, so it must be the served model's tokenizer: "
                    "point xkd.teacher.tokenizer_path at the tokenizer the server loaded (the folder given to "
                    "`axolotl xkd serve-teacher --model` or --tokenizer, or `vllm serve`'s model).")
        return ("X-KD compares distributions token id by token id, so both must use the same tokenizer: serve a "
                "teacher with the student's tokenizer, or set xkd.teacher.cross_tokenizer: true with "
                "xkd.teacher.tokenizer_path naming the served model's tokenizer to align the teacher's tokens with "
                "the student's (docs/cross_tokenizer.md).")

    # -- scoring -------------------------------------------------------------------------------------
    def score(self, sequences: list[list[int]], *, prompt_token: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence of n tokens, (n, k) ids and log-probs: row i is p_T(. | u_<=i), row n-1 is empty (-inf);
        with `prompt_token`, (n, k + 1): column k is u_{i+1} when it ranks below k (protocol.topk_rows).

        One request with one prompt per sequence, to vLLM's /v1/completions or (xkd.teacher.api: sglang) SGLang's
        /generate; both answer a list of token-id prompts with one result each.
        """
        if self.vocab_size is None:
            raise RuntimeError("TeacherServerClient.check_server must run before score")
        top_k = self.settings.top_k
        if self.settings.api == "sglang":
            path, payload, parse = GENERATE_PATH, generate_request(sequences, top_k), parse_generate_answer
        else:
            path, parse = "/v1/completions", parse_completion_answer
            payload = completion_request(self.model, sequences, top_k)

        def attempt() -> list[tuple[np.ndarray, np.ndarray]]:
            try:
                rows, dropped = parse(self._exchange("POST", path, payload), sequences, top_k=top_k,
                                      vocab_size=self.vocab_size, prompt_token=prompt_token)
            except BadAnswer as error:
                raise _Retryable(str(error)) from None
            except Refused as error:
                raise _Fatal(str(error), advice="retrying gets the same answer: change what the cause names") from None
            self._count_out_of_vocabulary(dropped)
            return rows

        tokens = sum(len(s) for s in sequences)
        return self._with_retries(f"POST {path} ({len(sequences)} sequences, {tokens} tokens)", attempt)

    def _count_out_of_vocabulary(self, dropped: int) -> None:
        """Count the entries dropped for ids beyond the tokenizer; warn at the first, then at each tenfold."""
        if not dropped:
            return
        with self._count_lock:
            before, self.out_of_vocabulary = self.out_of_vocabulary, self.out_of_vocabulary + dropped
        if before == 0 or len(str(before)) < len(str(self.out_of_vocabulary)):
            LOG.warning("xkd teacher server %s: %d top-k entries so far named token ids at or above the tokenizer's "
                        "%d tokens (the served model's vocabulary is padded beyond it, as vLLM serves "
                        "config.vocab_size); each carried under %g probability and was dropped into the tail mass",
                        self.base_url, self.out_of_vocabulary, self.vocab_size, OUT_OF_VOCAB_MASS)

    def submit(self, sequences: list[list[int]], *, prompt_token: bool = False) -> Future:
        """`score` in the thread pool."""
        return self._pool.submit(self.score, sequences, prompt_token=prompt_token)

    def close(self) -> None:
        """Drop queued requests; requests in flight end within their timeout."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def api_key_from_env(teacher: ServerTeacher) -> str | None:
    """The API key of an `xkd.teacher` block with `source: server`, read from the environment variable the block
    names (never from the YAML); None when it names none."""
    if not teacher.api_key_env:
        return None
    api_key = os.environ.get(teacher.api_key_env)
    if not api_key:
        raise ValueError(f"xkd.teacher.api_key_env={teacher.api_key_env!r}: that environment variable is not set "
                         "or empty; export the teacher server's API key in it (it is never read from the YAML).")
    return api_key
