"""A bounded load on a teacher server, through the server teacher's own client: `clients` threads, each with its
own `TeacherServerClient` (no retries, so every failure counts), send scoring requests of seeded random token ids
until each has sent `requests` of them, or until `seconds` have passed (then each finishes the request it is on).
Counts answers and failures, and times each request. Used by tests/e2e/test_faults.py (fixed counts) and
`python -m benchmarks.faults --cases server` (fixed duration)."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    clients: int
    prompts: int  # per request
    prompt_tokens: int  # per prompt
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    positions: int = 0  # prompt tokens scored in answered requests
    wall_s: float = 0.0

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile (nearest rank) of the answered requests' latency, in ms."""
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]

    @property
    def tokens_per_s(self) -> float:
        return self.positions / self.wall_s


def run_load(url: str, tokenizer, *, clients: int, requests: int | None = None, seconds: float | None = None,
             prompts: int = 4, prompt_tokens: int = 24, top_k: int = 20, api_key: str | None = None,
             seed: int = 0) -> LoadResult:
    """`clients` concurrent clients against the server at `url` (its tokenizer is `tokenizer`); exactly one of
    `requests` (per client) and `seconds` bounds the run."""
    from axolotl_xkd.args import ServerTeacher
    from axolotl_xkd.frozen_teacher import tokenizer_hash
    from axolotl_xkd.server.client import TeacherServerClient, TeacherServerError

    if (requests is None) == (seconds is None):
        raise ValueError("give exactly one of requests and seconds")
    settings = ServerTeacher(base_url=url, top_k=top_k, timeout_s=120, max_retries=0, concurrency=1,
                             request_tokens=prompts * prompt_tokens)
    fingerprint = tokenizer_hash(tokenizer)
    vocab = len(tokenizer)
    result = LoadResult(clients=clients, prompts=prompts, prompt_tokens=prompt_tokens)
    lock = threading.Lock()
    clock: dict[str, float] = {}

    def go() -> None:  # runs once, before the barrier releases anyone: every client sees the same deadline
        clock["began"] = time.monotonic()
        clock["deadline"] = clock["began"] + (seconds or 0.0)

    start = threading.Barrier(clients + 1, action=go)

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        scorer = TeacherServerClient(settings, api_key=api_key)
        try:
            scorer.check_server(tokenizer, fingerprint)
        finally:
            start.wait()
        sent = 0
        while (sent < requests) if requests is not None else (time.monotonic() < clock["deadline"]):
            batch = [[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(prompts)]
            began = time.perf_counter()
            try:
                answer = scorer.score(batch)
                assert len(answer) == prompts and all(ids.shape == (prompt_tokens, top_k) for ids, _ in answer)
            except (TeacherServerError, AssertionError) as error:
                with lock:
                    result.failures.append(f"client {index} request {sent}: {error}")
            else:
                elapsed = time.perf_counter() - began
                with lock:
                    result.answered += 1
                    result.latencies_s.append(elapsed)
                    result.positions += prompts * prompt_tokens
            sent += 1
        scorer.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()  # every client has checked the server: the clock starts together
    for thread in threads:
        thread.join()
    result.wall_s = time.monotonic() - clock["began"]
    return result
