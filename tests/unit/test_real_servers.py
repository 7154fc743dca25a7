"""The server client against answers recorded in vLLM's and SGLang's own formats (tests/fixtures/servers/, where
each layout's source is named), replayed by a loopback server: the start-up check with a vLLM-shaped /v1/models
card (no xkd_* fields) and /tokenize probe, the parsing of vLLM's prompt_logprobs and of SGLang's /generate, the
errors that name xkd.teacher.api, and the rule for ids of a vocabulary padded beyond the tokenizer."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from axolotl_xkd.args import ServerTeacher
from axolotl_xkd.frozen_teacher import tokenizer_hash
from axolotl_xkd.server.app import TeacherScorer
from axolotl_xkd.server.client import TeacherServerClient, TeacherServerError
from axolotl_xkd.tiny import build_model, build_tokenizer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "servers"
PROMPTS = [[1, 6, 67, 6, 70], [1, 13, 68, 5, 70]]  # <s>2+2=  <s>9-1=
# Per prompt, rows 0..3 (row i: the distribution after token i) as the fixtures carry them: the top 2 (id, log-prob),
# then the prompt's next token when it ranks below 2 (None when it is among the top 2, or has probability 0).
ROWS = [
    [([(30, -2.564152717590332), (33, -2.6392199993133545)], (6, -3.218944787979126)),
     ([(68, -1.6758840084075928), (67, -1.8295681476593018)], None),
     ([(7, -1.8038041591644287), (25, -2.0958945751190186)], (6, -4.26731014251709)),
     ([(70, -0.250307559967041), (36, -3.1504669189453125)], None)],
    [([(56, -2.59523868560791), (12, -2.898949384689331)], (13, -3.262272357940674)),
     ([(26, -2.2840163707733154), (57, -2.6661651134490967)], None),  # u = 68 has log-prob -inf (vLLM: -9999.0)
     ([(5, -2.2059967517852783), (73, -2.238525629043579)], None),
     ([(70, -0.3917977511882782), (54, -3.2192535400390625)], None)],
]


def expected(rows: list) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) ids and log-probs of one prompt (`score(..., prompt_token=True)`), -inf where nothing is sent."""
    ids, logprobs = np.zeros((len(rows) + 1, 3), np.int64), np.full((len(rows) + 1, 3), -np.inf)
    for i, (top, below) in enumerate(rows):
        for slot, (token, value) in enumerate(top + ([below] if below else [])):
            ids[i, slot], logprobs[i, slot] = token, value
    return ids, logprobs


def recorded(name: str) -> list[dict]:
    return json.loads((FIXTURES / f"{name}.json").read_text())["exchanges"]


class Replay(ThreadingHTTPServer):
    """Answers a request with the recorded answer to the same method, path and JSON body; a request nothing was
    recorded for gets a 400 and is kept in `unmatched` (the fixture fails the test on it)."""

    daemon_threads = True

    def __init__(self, exchanges: list[dict]) -> None:
        super().__init__(("127.0.0.1", 0), _ReplayHandler)
        self.exchanges = exchanges
        self.hits: Counter = Counter()
        self.unmatched: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ReplayHandler(BaseHTTPRequestHandler):
    server: Replay
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._answer(None)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def _answer(self, body: dict | None) -> None:
        self.server.hits[self.path] += 1
        match = [e for e in self.server.exchanges
                 if (e["method"], e["path"], e["request"]) == (self.command, self.path, body)]
        if match:
            status, answer = match[0]["status"], match[0]["response"]
        else:
            self.server.unmatched.append(f"{self.command} {self.path} {json.dumps(body)[:200]}")
            status, answer = 400, {"error": {"message": "nothing recorded for this request"}}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def replay():
    """Start a replay of a fixture file; `answers` replace recorded answers by (method, path)."""
    servers = []

    def start(name: str, answers: dict | None = None) -> Replay:
        exchanges = [{**e, "response": (answers or {}).get((e["method"], e["path"]), e["response"])}
                     for e in recorded(name)]
        server = Replay(exchanges)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
        assert not server.unmatched, f"requests the recorded servers never answered: {server.unmatched}"


def connect(url: str, **overrides) -> TeacherServerClient:
    settings = {"base_url": url, "top_k": 2, "timeout_s": 5.0, "max_retries": 2, "retry_backoff_s": 0.01,
                **overrides}
    client = TeacherServerClient(ServerTeacher(**settings))
    tokenizer = build_tokenizer()
    client.check_server(tokenizer, tokenizer_hash(tokenizer))
    return client


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_recorded_answers_parse_to_the_teacher_rows(replay, api, caplog):
    """vLLM's prompt_logprobs (the prompt token listed first at its real rank, a null first entry, -9999.0 for -inf)
    and SGLang's /generate input_top_logprobs (with null for -inf) give the same rows: row i <- entry i + 1, the top
    2 by rank, the prompt's next token in column 2 when it ranks below them. The start-up check reads a card with no
    xkd_* fields, so the tokenizer is checked through /tokenize, once."""
    server = replay(api)
    with caplog.at_level(logging.WARNING, logger="axolotl_xkd.server.client"):
        client = connect(server.url, api=api)
        answers = client.score(PROMPTS, prompt_token=True)
    assert "NOT checked" not in caplog.text and client.out_of_vocabulary == 0
    for (ids, logprobs), rows in zip(answers, ROWS):
        want_ids, want_logprobs = expected(rows)
        np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.where(np.isfinite(logprobs), ids, -1),
                                      np.where(np.isfinite(want_logprobs), want_ids, -1))
    scoring = "/generate" if api == "sglang" else "/v1/completions"
    assert server.hits == Counter({"/v1/models": 1, "/tokenize": 1, scoring: 1})


def test_vllm_refusal_of_top_k_above_max_logprobs_is_named_not_retried(replay):
    server = replay("vllm")
    client = connect(server.url, top_k=30, max_retries=3)
    with pytest.raises(TeacherServerError, match=r"after 1 attempt.*HTTP 400.*Requested prompt logprobs of 30, which "
                                                 r"is greater than max allowed: 20.*--max-logprobs"):
        client.score(PROMPTS)
    assert server.hits["/v1/completions"] == 1


@pytest.mark.parametrize(("served", "api", "fix"), [("sglang", "vllm", "sglang"), ("vllm", "sglang", "vllm")])
def test_server_of_the_other_kind_is_refused_at_start(replay, served, api, fix):
    """The /v1/models card names its server (owned_by): a vLLM-flavoured client of SGLang, or the reverse, stops
    before any batch, naming the key to set."""
    server = replay(served)
    with pytest.raises(TeacherServerError, match=rf"owned_by '{served}'.*xkd.teacher.api={api!r}.*set "
                                                 rf"xkd.teacher.api: {fix}"):
        connect(server.url, api=api)
    assert server.hits == Counter({"/v1/models": 1})


def test_sglang_completions_ignoring_prompt_logprobs_names_the_api_key(replay):
    """Behind a router whose card does not name SGLang, its /v1/completions answers without prompt_logprobs: one
    request, then an error saying so and naming xkd.teacher.api (before, the client retried and blamed the count of
    positions)."""
    card = {"object": "list", "data": [{"id": "tiny-teacher", "object": "model", "owned_by": "router"}]}
    server = replay("sglang", {("GET", "/v1/models"): card})
    client = connect(server.url, max_retries=3)
    with pytest.raises(TeacherServerError, match=r"after 1 attempt.*sequence 0: the answer has no prompt_logprobs.*"
                                                 r"xkd.teacher.api: sglang"):
        client.score(PROMPTS)
    assert server.hits["/v1/completions"] == 1


def test_tokenize_probe_catches_another_tokenizer(replay):
    """A vLLM card has no fingerprint: the probe text must tokenize alike through /tokenize."""
    tokenize = {"count": 75, "max_model_len": 64, "tokens": list(range(5, 80)), "token_strs": None}
    server = replay("vllm", {("POST", "/tokenize"): tokenize})
    with pytest.raises(TeacherServerError, match="tokenizes a probe text differently from the student "
                                                 r"\(first difference at token 0\)"):
        connect(server.url)


def test_padded_vocabulary_ids_are_dropped_counted_or_refused(replay, caplog):
    """vLLM's log-probs span config.vocab_size (80 here, the tokenizer has 79): id 79 with probability 7e-6 is
    dropped into the tail and counted; with probability 0.16 the answer is refused, naming the entry."""
    server = replay("vllm_padded_vocab")
    client = connect(server.url, max_retries=3)
    with caplog.at_level(logging.WARNING, logger="axolotl_xkd.server.client"):
        [(ids, logprobs)] = client.score([[1, 5, 67, 5, 70]])
    assert ids[1, 0] == 67 and math.exp(logprobs[1, 0]) == pytest.approx(0.9999243, abs=1e-6)
    assert np.isneginf(logprobs[1, 1]) and np.isfinite(logprobs[[0, 2, 3]]).all()
    assert client.out_of_vocabulary == 1 and "1 top-k entries so far named token ids at or above" in caplog.text
    with pytest.raises(TeacherServerError, match=r"after 1 attempt.*sequence 0: prompt_logprobs\[2\] has a token id "
                                                 r"outside the vocabulary \[0, 79\) with probability 0.158 \(id 79"):
        client.score([[1, 5, 67, 6, 70]])
    assert server.hits["/v1/completions"] == 2


def vllm_layout_problem(choice: dict, prompt: list[int], k: int) -> str | None:
    """What in a completions choice departs from vLLM's layout (recorded in tests/fixtures/servers/vllm.json)."""
    entries = choice["prompt_logprobs"]
    if entries[0] is not None or len(entries) != len(prompt):
        return "not one entry per prompt token with a null first"
    for j, entry in enumerate(entries[1:], start=1):
        keys, values = list(entry), list(entry.values())
        if keys[0] != str(prompt[j]) or any(set(v) != {"logprob", "rank", "decoded_token"} for v in values):
            return f"entry {j} does not list the prompt token first, or has other fields"
        top = values[1:] if values[0]["rank"] > k else values
        if [v["rank"] for v in sorted(top, key=lambda v: v["rank"])] != list(range(1, k + 1)):
            return f"entry {j} does not hold ranks 1..{k} beside the prompt token"
    return None


def test_serve_teacher_answers_in_the_recorded_vllm_layout():
    """`axolotl xkd serve-teacher` writes what the recorded vLLM answer shows: the choice fields are vLLM's, each
    entry lists the prompt token first, then ranks 1..k (the fixture itself follows the rule checked)."""
    tokenizer = build_tokenizer()
    scorer = TeacherScorer(build_model(tokenizer, hidden=32, layers=1, seed=0).eval(), tokenizer, name="tiny")
    [request] = [e for e in recorded("vllm") if e["path"] == "/v1/completions" and e["status"] == 200]
    vllm_choices = request["response"]["choices"]
    ours = scorer.complete({**request["request"], "model": "tiny"})["choices"]
    for choice, vllm_choice, prompt in zip(ours, vllm_choices, PROMPTS):
        assert set(choice) <= set(vllm_choice)
        assert vllm_layout_problem(vllm_choice, prompt, 2) is None
        assert vllm_layout_problem(choice, prompt, 2) is None
