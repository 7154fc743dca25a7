"""`axolotl xkd serve-teacher`: a small teacher server speaking the subset of vLLM's OpenAI API that the
server teacher's client (server/client.py) uses, backed by transformers; the wire format is server/protocol.py.

    GET  /v1/models       the model card, plus the tokenizer fingerprint (xkd_tokenizer_hash), special tokens,
                          vocabulary size and largest prompt_logprobs this server answers
    POST /v1/completions  {"prompt": [token ids] or a list of them, "prompt_logprobs": k, "max_tokens": 1}
                          -> choices[i].prompt_logprobs: [None, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]
                          (top k per position plus the prompt token, as vLLM answers); the one generated
                          token is the greedy one.

The standard library's ThreadingHTTPServer handles connections; the model runs one request at a time.
Bad requests get a 4xx with an OpenAI-style error body and the server keeps serving: 400 (not UTF-8 JSON, wrong
types, max_tokens other than 1), 401 (no or wrong API key, `Authorization: Bearer KEY`, when the server has one),
404 (unknown route or model), 408 (the body did not arrive within the request timeout), 411 (no Content-Length),
413 (a body over `max_request_bytes`, or a padded batch over `max_request_tokens` positions). A server bound to
anything other than loopback must have an API key. Each request logs one access line (client, method, path,
status, positions scored, seconds; never a header, so never the key) at INFO.
Imports torch, and transformers through frozen_teacher's loader; the CLI module imports it lazily.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
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
    completion_answer,
    completion_choice,
    error_answer,
    prompt_logprobs_entry,
)

LOG = logging.getLogger("axolotl_xkd")
MAX_REQUEST_BYTES = 64 << 20
MAX_REQUEST_TOKENS = 1 << 16  # 8x the client's default request_tokens
REQUEST_TIMEOUT_S = 60.0


class BadRequest(ValueError):
    """The request cannot be served; answered with HTTP `status` (a 4xx) and this message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (a host name other than localhost counts as not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_int(value: object) -> bool:
    return type(value) is int  # JSON true/false are bools, which isinstance(_, int) would accept


class TeacherScorer:
    """A causal LM and its tokenizer answering prompt_logprobs requests."""

    def __init__(self, model, tokenizer, *, name: str, top_k_max: int | None = None,
                 max_request_tokens: int = MAX_REQUEST_TOKENS) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        self.top_k_max = min(top_k_max or self.vocab_size, self.vocab_size)
        self.max_request_tokens = max_request_tokens
        config = model.config.get_text_config()
        self.max_model_len = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self.fingerprint = tokenizer_hash(tokenizer)
        self.device = next(model.parameters()).device
        self._decoded = tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", device: str | None = None, top_k_max: int | None = None,
             name: str | None = None, tokenizer_path: str | None = None, trust_remote_code: bool = False,
             attn_implementation: str | None = None, max_request_tokens: int = MAX_REQUEST_TOKENS) -> TeacherScorer:
        """Load a model directory (or hub id) with the one frozen-teacher loader, on `device` (default: cuda if
        present, else cpu). The student's tokenizer is checked by each client against the published fingerprint."""
        model, tokenizer = load_frozen_teacher(path, dtype=torch_dtype(dtype), tokenizer_path=tokenizer_path,
                                               trust_remote_code=trust_remote_code,
                                               attn_implementation=attn_implementation)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), tokenizer, name=name or path, top_k_max=top_k_max,
                   max_request_tokens=max_request_tokens)

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
        prompts = [prompt] if isinstance(prompt, list) and all(_is_int(t) for t in prompt) else prompt
        if not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, list) and p and all(_is_int(t) and 0 <= t < self.vocab_size for t in p) for p in prompts
        ):
            raise BadRequest(f"prompt must be a non-empty list of token ids in [0, {self.vocab_size}) (or a list "
                             "of such lists); this server takes no text prompts")
        for p in prompts:
            if self.max_model_len and len(p) + 1 > self.max_model_len:
                raise BadRequest(f"prompt of {len(p)} tokens plus max_tokens 1 exceeds max_model_len "
                                 f"{self.max_model_len}")
        padded = len(prompts) * max(len(p) for p in prompts)
        if padded > self.max_request_tokens:
            raise BadRequest(f"{len(prompts)} prompts padded to {max(len(p) for p in prompts)} tokens are {padded} "
                             f"positions, more than this server's --max-request-tokens {self.max_request_tokens} "
                             "in one forward; send fewer tokens per request (xkd.teacher.request_tokens)", 413)
        return prompts

    def complete(self, request: dict) -> dict:
        """The completions answer for `request` (one choice per prompt); BadRequest says what is wrong with it."""
        model = request.get("model")
        if model is not None and model != self.name:
            raise BadRequest(f"model {model!r} is not served here; this server serves {self.name!r}", 404)
        k = request.get("prompt_logprobs")
        if k is not None and (not _is_int(k) or not 0 <= k <= self.top_k_max):
            raise BadRequest(f"prompt_logprobs must be an integer in [0, {self.top_k_max}] (--top-k-max)")
        max_tokens = request.get("max_tokens", 16)
        if not _is_int(max_tokens) or max_tokens != 1:
            raise BadRequest("this server scores prompts only: max_tokens must be the integer 1")
        if request.get("stream"):
            raise BadRequest("stream is not supported")
        prompts = self._prompts(request)
        return completion_answer(self.name, self._choices(prompts, k), sum(len(p) for p in prompts))

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
            entries = None if k is None else self._entries(rows[:-1], prompt[1:], k)
            choices.append(completion_choice(i, next_id, self.tokenizer.decode([next_id]), entries))
        return choices

    def _entries(self, rows: torch.Tensor, actual: list[int], k: int) -> list[dict]:
        """Per position, the top k plus the prompt token when it is not among them (vLLM's layout)."""
        values, indices = rows.topk(k, dim=-1)
        actual_values = rows.gather(-1, torch.tensor(actual, dtype=torch.long)[:, None])
        actual_ranks = (rows > actual_values).sum(-1) + 1
        return [prompt_logprobs_entry(list(zip(top_ids, top_values)), token, value, rank, self._decoded)
                for top_ids, top_values, token, value, rank in zip(indices.tolist(), values.tolist(), actual,
                                                                   actual_values[:, 0].tolist(),
                                                                   actual_ranks.tolist())]


class _Handler(BaseHTTPRequestHandler):
    server: TeacherHTTPServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # A socket timeout bounds how long a connection may stall (an idle keep-alive, a body that never comes).
        self.timeout = self.server.request_timeout_s
        super().setup()

    def log_message(self, format: str, *args) -> None:
        LOG.debug("serve-teacher %s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _logged(self, handle: Callable[[], tuple[int, dict, int]]) -> None:
        """Run `handle` (it returns status, body and the positions it scored), count the request and write its
        access-log line, then answer: counted before the client can see the answer, so a client that stops the
        server right after its last answer finds that request in the shutdown line."""
        start = time.perf_counter()
        status, body, positions = handle() if self._authorized() else _error(401, self._unauthorized())
        self.server.record(status, positions)
        LOG.info('serve-teacher %s "%s %s" %d positions=%d %.3fs', self.client_address[0], self.command,
                 self.path, status, positions, time.perf_counter() - start)
        self._send(status, body)

    def _authorized(self) -> bool:
        """/health is open (for load balancers); the API routes need the key when the server has one."""
        key = self.server.api_key
        if key is None or self.path.rstrip("/") == "/health":
            return True
        sent = self.headers.get("Authorization", "")
        return sent.startswith("Bearer ") and hmac.compare_digest(sent[len("Bearer "):].encode(), key.encode())

    def _unauthorized(self) -> str:
        self._discard_body()
        said = "a wrong API key" if self.headers.get("Authorization") else "no API key"
        return (f"this server needs an API key (sent as 'Authorization: Bearer KEY'); the request had {said}. "
                "Set xkd.teacher.api_key_env to the name of an environment variable holding the server's key.")

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
            self._discard_body()
            return _error(404, f"no route {self.path}")
        try:
            request = json.loads(self._body())
            if not isinstance(request, dict):
                raise BadRequest("the body must be a JSON object")
            answer = self.server.scorer.complete(request)
        except BadRequest as error:
            return _error(error.status, str(error))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return _error(400, f"the body is not UTF-8 JSON ({type(error).__name__}: {str(error)[:200]})")
        except RecursionError:
            return _error(400, "the body nests JSON deeper than this server parses")
        except TimeoutError:
            self.close_connection = True
            return _error(408, f"the request body did not arrive within {self.server.request_timeout_s:g}s")
        except Exception as error:  # the server keeps serving; the client retries 5xx
            LOG.exception("serve-teacher: request failed")
            return _error(500, f"{type(error).__name__}: {error}")
        return 200, answer, answer["usage"]["prompt_tokens"]

    def _discard_body(self) -> None:
        """Read and drop the body of a request refused before its body was needed, so that the connection can
        carry the next request; one too large (or of unknown size) closes the connection after the answer."""
        length = self.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) <= self.server.max_request_bytes:
            self.rfile.read(int(length))
        elif length:
            self.close_connection = True

    def _body(self) -> bytes:
        """The request body, within the size limit; a body that is not read closes the connection after the
        answer, since its bytes would otherwise be taken for the next request."""
        length = self.headers.get("Content-Length")
        limit = self.server.max_request_bytes
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            if length is None:
                raise BadRequest("a Content-Length header is required (chunked bodies are not accepted)", 411)
            raise BadRequest(f"Content-Length {length[:40]!r} is not a number")
        if int(length) > limit:
            self.close_connection = True
            raise BadRequest(f"the body of {int(length)} bytes exceeds this server's --max-request-bytes {limit}; "
                             "send fewer tokens per request (xkd.teacher.request_tokens)", 413)
        if int(length) == 0:
            raise BadRequest("a JSON body is required")
        return self.rfile.read(int(length))


def _error(status: int, message: str) -> tuple[int, dict, int]:
    """An error answer that scored no position."""
    return status, error_answer(status, message), 0


class TeacherHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog (socketserver's default is 5): with more clients connecting at once than that, the kernel
    # resets the surplus connections (found by the 32-client load test, tests/e2e/test_faults.py).
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], scorer: TeacherScorer, *, api_key: str | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES, request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        if not is_loopback(address[0]) and not api_key:
            raise ValueError(f"serve-teacher: binding {address[0]!r} exposes the teacher beyond this machine; give "
                             "it an API key (--api-key or the XKD_TEACHER_API_KEY environment variable), or bind "
                             "127.0.0.1")
        super().__init__(address, _Handler)
        self.scorer = scorer
        self.api_key = api_key or None
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self.started = time.monotonic()
        self.requests = 0
        self.refused = 0
        self.positions = 0
        self._stats_lock = threading.Lock()

    def record(self, status: int, positions: int) -> None:
        """Count one answered request (handler threads run concurrently); a 4xx counts as refused."""
        with self._stats_lock:
            self.requests += 1
            self.refused += 400 <= status < 500
            self.positions += positions

    def summary(self) -> str:
        """Requests and positions answered since the server was made, for the shutdown line."""
        return (f"{self.requests} requests, {self.positions} positions scored, {self.refused} requests refused, "
                f"{time.monotonic() - self.started:.0f}s up")


def make_server(scorer: TeacherScorer, host: str = "127.0.0.1", port: int = 0, **options) -> TeacherHTTPServer:
    """Bind (port 0: a free port, read back from server_address) without serving yet; `options` are
    TeacherHTTPServer's (api_key, required off loopback; max_request_bytes; request_timeout_s)."""
    return TeacherHTTPServer((host, port), scorer, **options)
