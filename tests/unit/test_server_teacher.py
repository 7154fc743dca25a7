"""The server teacher's client against `axolotl xkd serve-teacher`'s server (in a thread) and against a
fault-injecting server on loopback: retries as configured, then a named error; never a hang."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pytest
import torch

from axolotl_xkd.args import ServerTeacher
from axolotl_xkd.frozen_teacher import tokenizer_hash
from axolotl_xkd.keys import TEACHER_TICKET, TOPK_IDS, TOPK_LOGPROBS
from axolotl_xkd.sequences import segments
from axolotl_xkd.server.app import TeacherScorer, make_server
from axolotl_xkd.server.client import TeacherServerClient, TeacherServerError
from axolotl_xkd.store.format import RowError, validate_rows
from axolotl_xkd.teachers.server import ServerTeacherSource
from axolotl_xkd.tiny import build_model, build_tokenizer
from axolotl_xkd.topk_rule import LOGPROB_TOLERANCE, topk_problem


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden=32, layers=1, seed=0).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def served(tiny):
    """`axolotl xkd serve-teacher`'s server on a free loopback port, in a thread."""
    tokenizer, model = tiny
    server = make_server(TeacherScorer(model, tokenizer, name="tiny"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def client_for(url: str, tokenizer, *, api_key: str | None = None, **overrides) -> TeacherServerClient:
    settings = {"base_url": url, "top_k": len(tokenizer), "timeout_s": 5.0, "max_retries": 2,
                "retry_backoff_s": 0.01, "concurrency": 2, **overrides}
    client = TeacherServerClient(ServerTeacher(**settings), api_key=api_key)
    client.check_server(tokenizer, tokenizer_hash(tokenizer))
    return client


def feature(tokenizer, text: str, prompt_len: int) -> dict:
    ids = tokenizer(text)["input_ids"]
    return {"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:], "attention_mask": [1] * len(ids),
            "position_ids": list(range(len(ids)))}


def packed_batch(tokenizer) -> dict:
    """Two packed rows built by Axolotl's own V2 multipack collator (padding, position_ids restarts)."""
    from axolotl.utils.collators.batching import V2BatchSamplerDataCollatorForSeq2Seq

    collator = V2BatchSamplerDataCollatorForSeq2Seq(tokenizer, return_tensors="pt", padding=True, pad_to_multiple_of=16)
    return dict(collator([[feature(tokenizer, "1+2=3", 4), feature(tokenizer, "22+33=55", 6)],
                          [feature(tokenizer, "9-1=8", 4)]]))


@pytest.mark.parametrize("request_tokens", [8, 8192], ids=["request_per_sequence", "one_request"])
def test_packed_batch_matches_in_process_teacher(tiny, served, request_tokens):
    """k = |V|: the server's signal equals the teacher's own log-softmax, segment by segment, at position i
    = p_T(. | u_<=i); the last position of a segment and padding get no entry."""
    tokenizer, model = tiny
    batch = packed_batch(tokenizer)
    assert segments(batch) == [(0, 0, 6), (0, 6, 15), (1, 0, 6)]
    source = ServerTeacherSource(client_for(served, tokenizer, request_tokens=request_tokens))
    source.submit(batch)
    assert len(source._pending[batch[TEACHER_TICKET]]) == (3 if request_tokens == 8 else 1)
    signal = source.get_signal(batch)
    dense = torch.full((*batch["input_ids"].shape, len(tokenizer)), -torch.inf)
    dense.scatter_(-1, signal.token_ids, signal.logprobs)
    with torch.no_grad():
        for b, start, end in segments(batch):
            logits = model(input_ids=batch["input_ids"][b: b + 1, start:end]).logits[0]
            expected = torch.log_softmax(logits.float(), dim=-1)
            torch.testing.assert_close(dense[b, start: end - 1], expected[:-1], atol=1e-5, rtol=5e-4)
            assert torch.isinf(dense[b, end - 1]).all()
    assert torch.isinf(dense[0, 15]).all() and torch.isinf(dense[1, 6:]).all()


def test_prefetch_sends_requests_ahead(tiny, served):
    """Drawing the first batch sends the requests of `prefetch` more batches; every batch then resolves."""
    tokenizer, _ = tiny
    source = ServerTeacherSource(client_for(served, tokenizer, prefetch=2, top_k=5))
    batches = [packed_batch(tokenizer) for _ in range(4)]
    epoch = iter(batches)
    stream = source.prefetched(epoch)
    first = next(stream)
    assert source.prefetched(epoch) is stream  # the trainer passes the same epoch iterator at every step
    assert [TEACHER_TICKET in b for b in batches] == [True, True, True, False]
    signals = [source.get_signal(first)] + [source.get_signal(b) for b in stream]
    assert len(signals) == 4 and all(s.logprobs.shape == (2, 16, 5) for s in signals)
    assert all(torch.isfinite(s.logprobs).all(-1).sum() == 18 for s in signals)


def test_other_tokenizer_is_refused_at_start(tiny, served):
    tokenizer, _ = tiny
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(TeacherServerError, match=rf"base_url={served}: model 'tiny' uses another tokenizer"):
        client_for(served, other, top_k=5)


HOLD_LIMIT_S = 120.0


class FaultServer(ThreadingHTTPServer):
    """Answers /v1/models correctly and /v1/completions with the fault named by `mode`; counts requests.

    Mode "timeout" holds every answer until the test sets `release` (after the client has given up), so the
    client's timeout is what ends each attempt, however slow the machine. Held answers give up after
    HOLD_LIMIT_S: a client that never times out then gets its answer and the test fails instead of hanging."""

    daemon_threads = True

    def __init__(self, tokenizer, mode: str, *, fail_first: int | None = None, record: dict | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _FaultHandler)
        self.tokenizer, self.mode, self.fail_first = tokenizer, mode, fail_first
        self.record = record  # mode "record": the top-k entry (token id string -> logprob) of the last position
        self.hits: Counter = Counter()
        self.auth: list[str | None] = []
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FaultHandler(BaseHTTPRequestHandler):
    server: FaultServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, data: bytes, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802
        tok = self.server.tokenizer
        card = {"id": "fault", "xkd_tokenizer_hash": tokenizer_hash(tok), "xkd_vocab_size": len(tok)}
        if self.server.mode == "tokenizer":
            card["xkd_tokenizer_hash"] = "0" * 64
        self.server.hits["models"] += 1
        self._send(200, json.dumps({"object": "list", "data": [card]}).encode())

    def do_POST(self) -> None:  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server, mode = self.server, self.server.mode
        server.hits["completions"] += 1
        server.auth.append(self.headers.get("Authorization"))
        n = len(request["prompt"][0])  # the client sends a list of token-id prompts (here: one)
        entry = {str(t): {"logprob": -float(t + 1), "rank": t + 1} for t in range(request["prompt_logprobs"])}
        good = json.dumps({"choices": [{"index": 0, "prompt_logprobs": [None] + [entry] * (n - 1)}]}).encode()
        if server.fail_first is not None and server.hits["completions"] > server.fail_first:
            mode = "ok"
        if mode == "ok":
            self._send(200, good)
        elif mode == "timeout":
            server.release.wait(HOLD_LIMIT_S)
            self._send(200, good)
        elif mode == "5xx":
            self._send(503, b'{"message": "overloaded"}')
        elif mode == "4xx":
            self._send(400, b'{"message": "prompt_logprobs above --max-logprobs"}')
        elif mode == "malformed":
            self._send(200, b'{"choices": [{"prompt_logprobs": [null, {"3": ')
        elif mode == "truncated":
            self._send(200, good[: len(good) // 2], length=len(good))
            self.close_connection = True
        elif mode == "positions":
            short = {"choices": [{"index": 0, "prompt_logprobs": [None] + [entry] * (n - 2)}]}
            self._send(200, json.dumps(short).encode())
        elif mode == "record":  # Python's json writes NaN / Infinity, which the client's json.loads reads
            record = {token: {"logprob": value} for token, value in server.record.items()}
            answer = {"choices": [{"index": 0, "prompt_logprobs": [None] + [entry] * (n - 2) + [record]}]}
            self._send(200, json.dumps(answer).encode())


@pytest.fixture()
def fault_server(tiny):
    servers = []

    def start(mode: str, **kwargs) -> FaultServer:
        server = FaultServer(tiny[0], mode, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


FAULTS = {
    "timeout": "no answer within timeout_s=0.3s",
    "5xx": "HTTP 503",
    "malformed": "malformed JSON",
    "truncated": "truncated answer: the connection closed after",
    "positions": "prompt_logprobs has 6 positions for a prompt of 7 tokens",
}


@pytest.mark.parametrize("mode", list(FAULTS))
def test_fault_is_retried_then_named(tiny, fault_server, mode):
    """1 + max_retries attempts reach the server, then TeacherServerError names the URL and the cause."""
    tokenizer, _ = tiny
    server = fault_server(mode)
    client = client_for(server.url, tokenizer, top_k=4, max_retries=2)
    if mode == "timeout":  # after the start-up check, which keeps client_for's 5 s
        client.settings = client.settings.model_copy(update={"timeout_s": 0.3})
    try:
        with pytest.raises(TeacherServerError) as error:
            client.score([list(range(1, 8))])
    finally:
        server.release.set()  # mode "timeout": the held answers go out only now, after the client gave up
    assert server.hits["completions"] == 3
    message = str(error.value)
    assert f"xkd.teacher.base_url={server.url}" in message and "after 3 attempt(s)" in message
    assert FAULTS[mode] in message


def test_connection_refused_is_retried_then_named(tiny, caplog):
    tokenizer, _ = tiny
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with caplog.at_level(logging.WARNING, logger="axolotl_xkd.server.client"), \
            pytest.raises(TeacherServerError, match=rf"base_url={url}: GET /v1/models failed after 3 attempt"):
        client_for(url, tokenizer, max_retries=2)
    assert "cannot connect" in caplog.text and caplog.text.count("retry") == 2


def test_client_error_is_not_retried(tiny, fault_server):
    tokenizer, _ = tiny
    server = fault_server("4xx")
    with pytest.raises(TeacherServerError, match="after 1 attempt.*HTTP 400.*max-logprobs"):
        client_for(server.url, tokenizer, top_k=4).score([[1, 2, 3]])
    assert server.hits["completions"] == 1


def test_transient_fault_recovers_and_sends_api_key(tiny, fault_server):
    """Two 503s, then an answer: the third attempt's result is used (alignment: row i <- entry i + 1)."""
    tokenizer, _ = tiny
    server = fault_server("5xx", fail_first=2)
    client = client_for(server.url, tokenizer, top_k=4, max_retries=2, api_key="s3cret")
    [(ids, logprobs)] = client.score([[1, 2, 3]])
    assert server.hits["completions"] == 3 and server.auth == ["Bearer s3cret"] * 3
    assert ids[:2].tolist() == [[0, 1, 2, 3]] * 2 and logprobs[0].tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert torch.isinf(torch.from_numpy(logprobs[2])).all()
    assert "s3cret" not in repr(client.settings) and "s3cret" not in repr(client)


def test_wrong_tokenizer_fault_server_is_refused(tiny, fault_server):
    tokenizer, _ = tiny
    server = fault_server("tokenizer")
    with pytest.raises(TeacherServerError, match="uses another tokenizer"):
        client_for(server.url, tokenizer)
    assert server.hits["models"] == 1 and server.hits["completions"] == 0


def test_failed_batch_is_never_handed_to_the_loss(tiny, fault_server):
    """get_signal raises (and drops the queued requests) instead of returning a batch with missing targets."""
    tokenizer, _ = tiny
    server = fault_server("5xx")
    source = ServerTeacherSource(client_for(server.url, tokenizer, top_k=4, max_retries=1))
    with pytest.raises(TeacherServerError, match="HTTP 503"):
        source.get_signal(packed_batch(tokenizer))
    with pytest.raises(RuntimeError, match="shutdown"):
        source.client.submit([[1, 2, 3]])


def test_config_checks_url_and_reads_key_from_named_variable(tiny, served, monkeypatch):
    from pydantic import ValidationError

    from axolotl_xkd.args import ServerTeacher
    from axolotl_xkd.teachers.build import load_server_teacher

    with pytest.raises(ValidationError, match="xkd.teacher.base_url='localhost:8000' must start with http"):
        ServerTeacher(base_url="localhost:8000")
    monkeypatch.delenv("XKD_TEST_TEACHER_KEY", raising=False)
    config = ServerTeacher(base_url=served, top_k=5, api_key_env="XKD_TEST_TEACHER_KEY")
    with pytest.raises(ValueError, match="api_key_env='XKD_TEST_TEACHER_KEY': that environment variable is not set"):
        load_server_teacher(config, tiny[0])
    monkeypatch.setenv("XKD_TEST_TEACHER_KEY", "k3y")
    source = load_server_teacher(config, tiny[0])
    assert source.client.api_key == "k3y" and "k3y" not in repr(source.client.settings)
    assert source.client.model == "tiny"


def test_server_off_loopback_needs_an_api_key():
    from axolotl_xkd.server.app import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "teacher.internal"))
    with pytest.raises(ValueError, match="binding '0.0.0.0'.*XKD_TEACHER_API_KEY"):
        make_server(None, "0.0.0.0", 0)


def test_client_sends_the_key_a_keyed_server_checks(tiny):
    """The two halves agree: the client's api_key (from xkd.teacher.api_key_env) is the Bearer token the server
    checks; without it, or with another, the start-up check stops at once with the server's 401 (no retry)."""
    tokenizer, model = tiny
    server = make_server(TeacherScorer(model, tokenizer, name="tiny"), "127.0.0.1", 0, api_key="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert len(client_for(url, tokenizer, api_key="s3cret").score([[1, 2, 3]])) == 1
        for key in (None, "guess"):
            with pytest.raises(TeacherServerError, match="after 1 attempt.*HTTP 401.*API key"):
                client_for(url, tokenizer, api_key=key)
    finally:
        server.shutdown()
        server.server_close()
# One position's top-k (k = 4) as a server sends it: token id strings ("01" and "1" are both id 1) -> log-prob.
RECORDS = {
    "nan": {"0": -1.0, "1": math.nan, "2": -3.0, "3": -4.0},
    "posinf": {"0": -1.0, "1": math.inf, "2": -3.0, "3": -4.0},
    "above_zero": {"0": 0.5, "1": -2.0, "2": -3.0, "3": -4.0},
    "mass": {"0": -0.1, "1": -0.2, "2": -0.3, "3": -0.4},
    "duplicate_id": {"1": -1.0, "01": -2.0, "2": -3.0, "3": -4.0},
    "outside_vocabulary": {"0": -1.0, "1": -2.0, "2": -3.0, "79": -4.0},
}


def store_row(record: dict) -> pa.Table:
    """A one-row store table (split encoding, float32 log-probs) whose one response position holds `record`."""
    ids, logprobs = [int(t) for t in record], [float(v) for v in record.values()]
    return pa.table({"input_ids": pa.array([[5, 5]], pa.list_(pa.int32())),
                     "labels": pa.array([[-100, 5]], pa.list_(pa.int32())),
                     TOPK_IDS: pa.array([ids], pa.list_(pa.int32())),
                     TOPK_LOGPROBS: pa.array([logprobs], pa.list_(pa.float32()))})


@pytest.mark.parametrize("case", list(RECORDS))
def test_store_and_server_client_refuse_the_same_records(tiny, fault_server, case):
    """One top-k rule (axolotl_xkd.topk_rule): a record the store reader refuses, the server client refuses too, in
    the same words, each naming where it is (store: row and field; server: URL, sequence and entry). Duplicate ids
    in a store row were accepted before the rule was shared; the server path had no sum check."""
    tokenizer, _ = tiny
    record = RECORDS[case]
    pairs = sorted(((int(t), v) for t, v in record.items()), key=lambda pair: -pair[1])
    what = topk_problem(np.array([[t for t, _ in pairs]]), np.array([[v for _, v in pairs]]),
                        vocab_size=len(tokenizer)).what
    with pytest.raises(RowError) as stored:
        validate_rows(store_row(record), top_k=4, vocab_size=len(tokenizer), where="store/train/shard-00000")
    assert f"store/train/shard-00000: row 0, field '{TOPK_IDS if 'id' in case else TOPK_LOGPROBS}'" in str(stored.value)
    assert what in str(stored.value)
    server = fault_server("record", record=record)
    with pytest.raises(TeacherServerError) as served:
        client_for(server.url, tokenizer, top_k=4, max_retries=0).score([[1, 2, 3]])
    assert f"base_url={server.url}" in str(served.value) and "sequence 0: prompt_logprobs[2] has" in str(served.value)
    assert what in str(served.value)


def test_store_and_server_client_accept_vllm_rounding(tiny, fault_server):
    """A log-prob a little above 0 (float32 rounding of z - logsumexp(z), which vLLM sends as it is) is accepted by
    both, within the rule's LOGPROB_TOLERANCE; the client clamps it to 0."""
    tokenizer, _ = tiny
    record = {"0": LOGPROB_TOLERANCE / 2, "1": -12.0, "2": -13.0, "3": -14.0}
    validate_rows(store_row(record), top_k=4, vocab_size=len(tokenizer))
    [(ids, logprobs)] = client_for(fault_server("record", record=record).url, tokenizer, top_k=4).score([[1, 2, 3]])
    assert ids[1].tolist() == [0, 1, 2, 3] and logprobs[1].tolist() == [0.0, -12.0, -13.0, -14.0]
