"""`axolotl xkd serve-teacher`: a small teacher server speaking the subset of vLLM's OpenAI API that the
server teacher's client (server/client.py) uses, backed by transformers; the wire format is server/protocol.py.

    GET  /v1/models       the model card, plus the tokenizer fingerprint (xkd_tokenizer_hash), special tokens,
                          vocabulary size and largest prompt_logprobs this server answers
    POST /v1/completions  {"prompt": [token ids] or a list of them, "prompt_logprobs": k, "max_tokens": 1}
                          -> choices[i].prompt_logprobs: [None, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]
                          (top k per position plus the prompt token, as vLLM answers); the one generated
                          token is the greedy one.

The standard library's ThreadingHTTPServer handles connections; the model runs one request at a time.
Each request logs one access line (client, method, path, status, positions scored, seconds) at INFO.
Imports torch, and transformers through frozen_teacher's loader; the CLI module imports it lazily.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from axolotl_xkd.frozen_teacher import load_frozen_teacher, special_tokens, tokenizer_hash
from axolotl_xkd.losses.precision import torch_dtype
from axolotl_xkd.sequences import right_pad
from axolotl_xkd.server.protocol import (
    INFO_SPECIAL_TOKENS,
    INFO_TOKENIZER_HASH,
    INFO_TOP_K_MAX,
    INFO_VOCAB_SIZE,
    LOGPROB_FLOOR,
)

LOG = logging.getLogger("axolotl_xkd")
_MAX_BODY = 64 << 20


class BadRequest(ValueError):
    """The request cannot be served; answered with HTTP 400 and this message."""


class TeacherScorer:
    """A causal LM and its tokenizer answering prompt_logprobs requests."""

    def __init__(self, model, tokenizer, *, name: str, top_k_max: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        self.top_k_max = min(top_k_max or self.vocab_size, self.vocab_size)
        config = model.config.get_text_config()
        self.max_model_len = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self.fingerprint = tokenizer_hash(tokenizer)
        self.device = next(model.parameters()).device
        self._decoded = tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", device: str | None = None, top_k_max: int | None = None,
             name: str | None = None, tokenizer_path: str | None = None, trust_remote_code: bool = False,
             attn_implementation: str | None = None) -> TeacherScorer:
        """Load a model directory (or hub id) with the one frozen-teacher loader, on `device` (default: cuda if
        present, else cpu). The student's tokenizer is checked by each client against the published fingerprint."""
        model, tokenizer = load_frozen_teacher(path, dtype=torch_dtype(dtype), tokenizer_path=tokenizer_path,
                                               trust_remote_code=trust_remote_code,
                                               attn_implementation=attn_implementation)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), tokenizer, name=name or path, top_k_max=top_k_max)

    def model_card(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "axolotl_xkd",
            "max_model_len": self.max_model_len,
            INFO_TOKENIZER_HASH: self.fingerprint,
            INFO_SPECIAL_TOKENS: special_tokens(self.tokenizer),
            INFO_VOCAB_SIZE: self.vocab_size,
            INFO_TOP_K_MAX: self.top_k_max,
        }

    def _prompts(self, request: dict) -> list[list[int]]:
        prompt = request.get("prompt")
        prompts = [prompt] if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) else prompt
        if not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < self.vocab_size for t in p)
            for p in prompts
        ):
            raise BadRequest(f"prompt must be a non-empty list of token ids in [0, {self.vocab_size}) (or a list "
                             "of such lists); this server takes no text prompts")
        for p in prompts:
            if self.max_model_len and len(p) + 1 > self.max_model_len:
                raise BadRequest(f"prompt of {len(p)} tokens plus max_tokens 1 exceeds max_model_len "
                                 f"{self.max_model_len}")
        return prompts

    def complete(self, request: dict) -> dict:
        """The completions answer for `request` (one choice per prompt)."""
        model = request.get("model")
        if model is not None and model != self.name:
            raise BadRequest(f"model {model!r} is not served here; this server serves {self.name!r}")
        k = request.get("prompt_logprobs")
        if k is not None and (not isinstance(k, int) or not 0 <= k <= self.top_k_max):
            raise BadRequest(f"prompt_logprobs must be an integer in [0, {self.top_k_max}] (--top-k-max)")
        if request.get("max_tokens", 16) != 1:
            raise BadRequest("this server scores prompts only: max_tokens must be 1")
        if request.get("stream"):
            raise BadRequest("stream is not supported")
        prompts = self._prompts(request)
        choices = self._choices(prompts, k)
        tokens = sum(len(p) for p in prompts)
        return {
            "id": f"cmpl-{time.time_ns():x}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {"prompt_tokens": tokens, "completion_tokens": len(prompts),
                      "total_tokens": tokens + len(prompts)},
        }

    @torch.no_grad()
    def _choices(self, prompts: list[list[int]], k: int | None) -> list[dict]:
        """One right-padded forward over all prompts; a choice per prompt."""
        ids, mask = right_pad(prompts, 0)
        with self._lock:
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                use_cache=False).logits[..., : self.vocab_size]
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        choices = []
        for i, prompt in enumerate(prompts):
            rows = logprobs[i, : len(prompt)]
            next_id = int(rows[-1].argmax())
            entries = None if k is None else [None] + self._entries(rows[:-1], prompt[1:], k)
            choices.append({"index": i, "text": self.tokenizer.decode([next_id]), "logprobs": None,
                            "finish_reason": "length", "stop_reason": None, "token_ids": [next_id],
                            "prompt_logprobs": entries})
        return choices

    def _entries(self, rows: torch.Tensor, actual: list[int], k: int) -> list[dict]:
        """Per position, the top k plus the prompt token when it is not among them (vLLM's layout)."""
        values, indices = rows.topk(k, dim=-1)
        actual_ids = torch.tensor(actual, dtype=torch.long)[:, None]
        actual_values = rows.gather(-1, actual_ids)
        actual_ranks = (rows > actual_values).sum(-1) + 1
        out = []
        for top_ids, top_values, token, value, rank in zip(indices.tolist(), values.tolist(), actual,
                                                           actual_values[:, 0].tolist(), actual_ranks.tolist()):
            entry = {str(t): self._logprob(t, v, r) for r, (t, v) in enumerate(zip(top_ids, top_values), start=1)}
            if str(token) not in entry:
                entry[str(token)] = self._logprob(token, value, rank)
            out.append(entry)
        return out

    def _logprob(self, token: int, value: float, rank: int) -> dict:
        logprob = value if math.isfinite(value) else LOGPROB_FLOOR
        return {"logprob": logprob, "rank": rank, "decoded_token": self._decoded[token]}


class _Handler(BaseHTTPRequestHandler):
    server: TeacherHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:
        LOG.debug("serve-teacher %s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _logged(self, handle: Callable[[], tuple[int, dict, int]]) -> None:
        """Run `handle` (it returns status, body and the positions it scored), count the request and write its
        access-log line, then answer: counted before the client can see the answer, so a client that stops the
        server right after its last answer finds that request in the shutdown line."""
        start = time.perf_counter()
        status, body, positions = handle()
        self.server.record(positions)
        LOG.info('serve-teacher %s "%s %s" %d positions=%d %.3fs', self.client_address[0], self.command,
                 self.path, status, positions, time.perf_counter() - start)
        self._send(status, body)

    def do_GET(self) -> None:
        self._logged(self._get)

    def do_POST(self) -> None:
        self._logged(self._post)

    def _get(self) -> tuple[int, dict, int]:
        if self.path.rstrip("/") == "/v1/models":
            return 200, {"object": "list", "data": [self.server.scorer.model_card()]}, 0
        if self.path.rstrip("/") == "/health":
            return 200, {}, 0
        return _error(404, f"no route {self.path}")

    def _post(self) -> tuple[int, dict, int]:
        if self.path.rstrip("/") != "/v1/completions":
            return _error(404, f"no route {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= _MAX_BODY:
            return _error(400, f"a JSON body of 1 to {_MAX_BODY} bytes is required")
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict):
                raise BadRequest("the body must be a JSON object")
            answer = self.server.scorer.complete(request)
        except (json.JSONDecodeError, BadRequest) as error:
            return _error(400, str(error))
        except Exception as error:  # the server keeps serving; the client retries 5xx
            LOG.exception("serve-teacher: request failed")
            return _error(500, f"{type(error).__name__}: {error}")
        return 200, answer, answer["usage"]["prompt_tokens"]


def _error(status: int, message: str) -> tuple[int, dict, int]:
    """An OpenAI-style error answer that scored no position."""
    return status, {"object": "error", "message": message, "type": "BadRequestError", "code": status}, 0


class TeacherHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], scorer: TeacherScorer) -> None:
        super().__init__(address, _Handler)
        self.scorer = scorer
        self.started = time.monotonic()
        self.requests = 0
        self.positions = 0
        self._stats_lock = threading.Lock()

    def record(self, positions: int) -> None:
        """Count one answered request (handler threads run concurrently)."""
        with self._stats_lock:
            self.requests += 1
            self.positions += positions

    def summary(self) -> str:
        """Requests and positions answered since the server was made, for the shutdown line."""
        return (f"{self.requests} requests, {self.positions} positions scored, "
                f"{time.monotonic() - self.started:.0f}s up")


def make_server(scorer: TeacherScorer, host: str = "127.0.0.1", port: int = 0) -> TeacherHTTPServer:
    """Bind (port 0: a free port, read back from server_address) without serving yet."""
    return TeacherHTTPServer((host, port), scorer)
