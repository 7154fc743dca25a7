"""Faults injected into real runs: `axolotl xkd serve-teacher` under load and bad requests; `axolotl train` killed
and resumed (one process, and one rank of two); a teacher server killed during training and restarted in time or
too late. The longer soak is `python -m benchmarks.faults`; what a user does after each fault is docs/faults.md.
"""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

import pytest

from tests.server_load import run_load
from tests.support import TeacherServerProcess, run_cli

pytestmark = pytest.mark.e2e

# -- Server under load ----------------------------------------------------------------------------------------------

API_KEY = "xkd-test-key-5f0c"  # a test value; the assertions check it never shows in the server's output
MAX_BYTES = 4096
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def keyed_server(untrained_assets):
    """serve-teacher bound to every interface (so it needs a key: from XKD_TEACHER_API_KEY) with small limits."""
    server = TeacherServerProcess(untrained_assets["teacher"], "--max-request-bytes", str(MAX_BYTES),
                                  "--max-request-tokens", str(MAX_TOKENS), "--served-model-name", "tiny",
                                  host="0.0.0.0", env={"XKD_TEACHER_API_KEY": API_KEY})
    yield server
    server.stop()


def exchange(url: str, body: bytes | None, headers: dict[str, str], path: str = "/v1/completions",
             method: str = "POST") -> tuple[int, dict]:
    """One request on a fresh connection with exactly these headers (Content-Length only when given)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def good_request(prompts: list[list[int]] | None = None, **fields) -> dict:
    return {"model": "tiny", "prompt": prompts or [[5, 6, 7, 8], [9, 10, 11]], "max_tokens": 1,
            "prompt_logprobs": 3, **fields}


def authorized(body: bytes) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}", "Content-Length": str(len(body))}


def as_json(request: object) -> bytes:
    return json.dumps(request).encode()


BAD_REQUESTS = {
    # name: (body, headers (None: the key; Content-Length is added for a body), path, status, words in the message)
    "oversized body": (None, {"Authorization": f"Bearer {API_KEY}", "Content-Length": str(MAX_BYTES + 1)},
                       "/v1/completions", 413, "--max-request-bytes"),
    "too many positions": (as_json(good_request([[1] * 16] * 17)), None, "/v1/completions", 413,
                           "--max-request-tokens"),
    "not JSON": (b'{"prompt": [1, 2', None, "/v1/completions", 400, "not UTF-8 JSON"),
    "not UTF-8": (b'{"prompt": "\xff\xfe\x80"}', None, "/v1/completions", 400, "not UTF-8 JSON"),
    "deeply nested": (b"[" * 2000 + b"]" * 2000, None, "/v1/completions", 400, "nests JSON deeper"),
    "not an object": (as_json([1, 2, 3]), None, "/v1/completions", 400, "JSON object"),
    "text prompt": (as_json(good_request(prompts="two plus two")), None, "/v1/completions", 400, "token ids"),
    "boolean token": (as_json(good_request([[1, True, 3]])), None, "/v1/completions", 400, "token ids"),
    "token outside the vocabulary": (as_json(good_request([[1, 10 ** 9]])), None, "/v1/completions", 400,
                                     "token ids"),
    "string prompt_logprobs": (as_json(good_request(prompt_logprobs="3")), None, "/v1/completions", 400,
                               "prompt_logprobs"),
    "string max_tokens": (as_json(good_request(max_tokens="1")), None, "/v1/completions", 400, "max_tokens"),
    "wrong model": (as_json(good_request(model="gpt-4")), None, "/v1/completions", 404, "'gpt-4' is not served"),
    "no Content-Length": (None, {"Authorization": f"Bearer {API_KEY}"}, "/v1/completions", 411, "Content-Length"),
    "unknown route": (as_json(good_request()), None, "/v1/chat/completions", 404, "no route"),
    "no API key": (as_json(good_request()), {}, "/v1/completions", 401, "no API key"),
    "wrong API key": (as_json(good_request()), {"Authorization": "Bearer guess"}, "/v1/completions", 401,
                      "a wrong API key"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_a_4xx_with_a_message_and_the_server_keeps_serving(keyed_server, case):
    body, headers, path, status, words = BAD_REQUESTS[case]
    headers = {"Authorization": f"Bearer {API_KEY}"} if headers is None else dict(headers)
    if body is not None:
        headers.setdefault("Content-Length", str(len(body)))
    got, answer = exchange(keyed_server.url, body, headers, path)
    assert got == status and answer["object"] == "error" and answer["code"] == status, (got, answer)
    assert words in answer["message"], answer["message"]
    # The next request, on a new connection, is answered.
    body = as_json(good_request())
    got, answer = exchange(keyed_server.url, body, authorized(body))
    assert got == 200 and [len(c["prompt_logprobs"]) for c in answer["choices"]] == [4, 3], answer
    assert keyed_server.proc.poll() is None


def test_api_key_guards_the_api_and_is_never_logged(keyed_server):
    status, _ = exchange(keyed_server.url, None, {}, "/v1/models", "GET")
    assert status == 401
    status, card = exchange(keyed_server.url, None, {"Authorization": f"Bearer {API_KEY}"}, "/v1/models", "GET")
    assert status == 200 and card["data"][0]["id"] == "tiny"
    assert exchange(keyed_server.url, None, {}, "/health", "GET")[0] == 200  # open, for load balancers
    assert "API key required" in keyed_server.output and API_KEY not in keyed_server.output


def test_binding_off_loopback_without_a_key_is_refused(untrained_assets):
    proc = run_cli(["axolotl", "xkd", "serve-teacher", "--model", str(untrained_assets["teacher"]), "--host",
                    "0.0.0.0", "--port", "0"], env={"XKD_TEACHER_API_KEY": ""}, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--host 0.0.0.0" in proc.stderr and "XKD_TEACHER_API_KEY" in proc.stderr, proc.stderr


CLIENTS, REQUESTS = 32, 4


def test_load_of_32_concurrent_clients_is_answered_in_full(untrained_assets):
    """32 clients x 4 requests (4 prompts x 24 tokens, top 20), no retries: every request answered, and the
    server counts exactly those requests (plus each client's start-up GET /v1/models)."""
    from transformers import AutoTokenizer

    server = TeacherServerProcess(untrained_assets["teacher"], "--num-threads", "1")
    try:
        result = run_load(server.url, AutoTokenizer.from_pretrained(untrained_assets["tokenizer"]), clients=CLIENTS,
                          requests=REQUESTS)
    finally:
        output = server.stop()
    assert result.failures == [] and result.answered == CLIENTS * REQUESTS
    positions = CLIENTS * REQUESTS * result.prompts * result.prompt_tokens
    summary = re.search(r"stopped by SIGTERM after (\d+) requests, (\d+) positions scored, (\d+) requests refused",
                        output)
    assert summary is not None, output[-3000:]
    assert [int(g) for g in summary.groups()] == [CLIENTS * REQUESTS + CLIENTS, positions, 0]
    print(f"load: {result.answered} requests, p50 {result.percentile_ms(50):.1f} ms, "
          f"p99 {result.percentile_ms(99):.1f} ms, {result.tokens_per_s:.0f} tokens/s")
