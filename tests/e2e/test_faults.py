"""Faults injected into real runs: `axolotl xkd serve-teacher` under load and bad requests; `axolotl train` killed
and resumed (one process, and one rank of two); a teacher server killed during training and restarted in time or
too late. The cases marked `soak` (each starts two or three training runs, some on two ranks) are left out of
`scripts/test.sh` (pyproject's addopts) to keep CI within its budget and run by `python -m benchmarks.faults --cases
training`, with the longer soak; what a user does after each fault is docs/faults.md.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from axolotl_xkd.reward_store import load_reward_head
from benchmarks.server_load import run_load
from tests.support import (
    BIN,
    REPO,
    TeacherServerProcess,
    base_config,
    cli_env,
    free_port,
    merged,
    run_cli,
    with_first_rows,
    write_config,
)

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


# -- Training killed ------------------------------------------------------------------------------------------------

WRAPPER = str(REPO / "tests" / "e2e" / "fault_at_step.py")
RUN_ENV = {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
SHORT = {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 5, "save_steps": 2}
WEIGHTS = ("model.safetensors", "xkd_reward_head.safetensors")


class Training:
    """A training process started by the test (so that waitpid sees it stop), its output read by a thread."""

    def __init__(self, args: list[str], *, fault: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(args, env=cli_env({**RUN_ENV, **(fault or {})}), cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_stopped(self) -> None:
        """Block until the process stops itself (SIGSTOP from fault_at_step.py)."""
        _, status = os.waitpid(self.proc.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            self._reader.join(timeout=30)
            raise AssertionError(f"the run ended (status {status}) before its fault step:\n{self.output[-6000:]}")

    def wait_for(self, text: str, timeout: float) -> None:
        """Block until a line holding `text` was printed."""
        with self._seen:
            if not self._seen.wait_for(lambda: text in self.output, timeout=timeout):
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output[-6000:]}")

    def finish(self, timeout: float = 600) -> int:
        """Wait for the exit (a hang fails the test after `timeout` seconds); returns the exit status."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout}s:\n{self.output[-6000:]}") from None
        self._reader.join(timeout=30)
        return self.proc.returncode


def python_train(config_path: Path) -> list[str]:
    return [sys.executable, WRAPPER, str(config_path)]


def torchrun_train(config_path: Path) -> list[str]:
    # A port of its own (PET_MASTER_PORT, from cli_env): torchrun's default 29500 may be another job's.
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", WRAPPER, str(config_path)]


def completed(args: list[str]) -> None:
    run = Training(args)
    assert run.finish() == 0, run.output[-8000:]


def final_state(output_dir: Path) -> dict:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())


def step_logs(output_dir: Path) -> list[dict]:
    """The per-step training log entries of the run's newest checkpoint, in order."""
    return [e for e in final_state(output_dir)["log_history"] if "loss" in e]


def assert_same_weights(got: Path, want: Path, *, exact: bool = True) -> None:
    for name in WEIGHTS:
        a, b = load_file(got / name), load_file(want / name)
        assert a.keys() == b.keys(), name
        for key in b:
            if exact:
                assert a[key].equal(b[key]), (name, key, (a[key] - b[key]).abs().max())
            else:
                import torch

                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def assert_log_continues(resumed: Path, straight: Path, steps: int) -> None:
    """The resumed run's log has every step once, in order, with the uninterrupted run's values (loss, grad_norm
    and every xkd/* metric, as logged) except the time shares, which are wall-clock measurements."""
    got, want = step_logs(resumed), step_logs(straight)
    assert [e["step"] for e in got] == [e["step"] for e in want] == list(range(1, steps + 1))
    assert all("xkd/loss_time_share" in e for e in got)
    keys = [k for k in want[0] if k.startswith("xkd/") and not k.endswith("_time_share")] + ["loss", "grad_norm"]
    assert len(keys) > 4
    for a, b in zip(got, want):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]


@pytest.fixture(scope="module")
def short_assets(untrained_assets, tmp_path_factory) -> dict[str, Path]:
    """64 rows: enough for the 5 steps of 8 rows without a second epoch."""
    return with_first_rows(untrained_assets, tmp_path_factory.mktemp("short"), 64)


def teacher_block(kind: str, assets: dict[str, Path], tmp: Path) -> dict:
    if kind == "model":
        return {"source": "model", "path": str(assets["teacher"])}
    prep = write_config(tmp / "prep.yml", base_config(assets, tmp / "prep"))
    run_cli(["axolotl", "xkd", "precompute", str(prep), "--out", str(tmp / "store"), "--top-k", "8"])
    return {"source": "precomputed", "path": str(tmp / "store")}


@pytest.mark.parametrize(("teacher", "stop_at"), [("model", 3), pytest.param("precomputed", 5, marks=pytest.mark.soak)])
def test_killed_run_resumes_to_the_uninterrupted_run(short_assets, tmp_path, teacher, stop_at):
    """SIGKILL after checkpoint-2 (in-process teacher) or at the last step, after checkpoint-4 (precomputed store);
    resume from it: the student and the reward head equal the uninterrupted run's bit for bit (one process, the
    same kernels in the same order), and the log has each step once with the uninterrupted run's values."""
    config = merged(base_config(short_assets, tmp_path), {**SHORT, "xkd": {"teacher": None}})
    config["xkd"]["teacher"] = teacher_block(teacher, short_assets, tmp_path)
    straight = merged(config, {"output_dir": str(tmp_path / "straight")})
    completed(python_train(write_config(tmp_path / "straight.yml", straight)))

    out = Path(config["output_dir"])
    path = write_config(tmp_path / "killed.yml", config)
    run = Training(python_train(path), fault={"XKD_FAULT_STEP": str(stop_at)})
    run.wait_stopped()
    last = stop_at - stop_at % 2
    # Stopped after step `stop_at`'s update, before its log line and any later checkpoint.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(2, last + 1, 2)]
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL

    resumed = merged(config, {"resume_from_checkpoint": str(out / f"checkpoint-{last}")})
    completed(python_train(write_config(tmp_path / "resumed.yml", resumed)))
    assert_same_weights(out, tmp_path / "straight")
    assert_log_continues(out, tmp_path / "straight", SHORT["max_steps"])


@pytest.mark.soak
def test_killed_at_random_steps_again_and_again_resumes_to_the_uninterrupted_run(short_assets, tmp_path):
    """Three SIGKILLs at seeded random steps (XKD_FAULT_SEED, default 0), each of a run resumed from the newest
    checkpoint the previous one left: the last resume ends with the uninterrupted run's student and reward head bit
    for bit, and its log has every step once with the uninterrupted run's values."""
    import random

    seed = int(os.environ.get("XKD_FAULT_SEED", "0"))
    rng = random.Random(seed)
    steps = 8
    config = merged(base_config(short_assets, tmp_path), {**SHORT, "max_steps": steps, "xkd": {"teacher": None}})
    config["xkd"]["teacher"] = teacher_block("model", short_assets, tmp_path)
    completed(python_train(write_config(tmp_path / "straight.yml",
                                        merged(config, {"output_dir": str(tmp_path / "straight")}))))
    out = Path(config["output_dir"])
    newest, kills = 0, []
    for kill in range(3):
        step = rng.randint(newest + 1, steps)  # after the newest checkpoint, up to the last step
        resume = {"resume_from_checkpoint": str(out / f"checkpoint-{newest}")} if newest else {}
        run = Training(python_train(write_config(tmp_path / f"killed{kill}.yml", merged(config, resume))),
                       fault={"XKD_FAULT_STEP": str(step)})
        run.wait_stopped()
        os.kill(run.proc.pid, signal.SIGKILL)
        assert run.finish() == -signal.SIGKILL
        kills.append(step)
        # Killed after step `step`'s update, before its checkpoint: the newest one is the save before it.
        newest = (step - 1) // SHORT["save_steps"] * SHORT["save_steps"]
        assert max((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")), default=0) == newest, kills
    resume = {"resume_from_checkpoint": str(out / f"checkpoint-{newest}")} if newest else {}
    completed(python_train(write_config(tmp_path / "resumed.yml", merged(config, resume))))
    print(f"seed {seed}: killed at steps {kills}")
    assert_same_weights(out, tmp_path / "straight")
    assert_log_continues(out, tmp_path / "straight", steps)


@pytest.mark.soak
def test_killed_rank_stops_the_job_naming_it_and_the_resume_matches(short_assets, tmp_path):
    """Two ranks under ZeRO-2: rank 1 SIGKILLed after step 3 (checkpoint-2 written). torchrun stops the other rank
    and exits non-zero naming rank 1 (the test's timeout bounds the wait); resumed from checkpoint-2, the run
    ends with the uninterrupted two-rank run's weights and log."""
    deepspeed = str(REPO / "example_configs" / "deepspeed" / "zero2.json")
    config = merged(base_config(short_assets, tmp_path), {**SHORT, "max_steps": 4, "deepspeed": deepspeed})
    completed(torchrun_train(write_config(tmp_path / "straight.yml",
                                          merged(config, {"output_dir": str(tmp_path / "straight")}))))

    out = Path(config["output_dir"])
    run = Training(torchrun_train(write_config(tmp_path / "killed.yml", config)),
                   fault={"XKD_FAULT_STEP": "3", "XKD_FAULT_ACTION": "kill", "XKD_FAULT_RANK": "1"})
    assert run.finish(timeout=300) != 0
    assert "fault_at_step: kill at the end of step 3" in run.output
    failure = run.output[run.output.rindex("Root Cause"):]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", failure) and "exitcode  : -9" in failure, failure
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]

    resumed = merged(config, {"resume_from_checkpoint": str(out / "checkpoint-2")})
    completed(torchrun_train(write_config(tmp_path / "resumed.yml", resumed)))
    assert_same_weights(out, tmp_path / "straight")
    assert_log_continues(out, tmp_path / "straight", 4)


def test_ctrl_c_leaves_a_marked_folder_with_the_head_and_a_resume_command_that_works(short_assets, tmp_path):
    """Issue 35: Ctrl-C at step 105 of 270 left Axolotl's step-105 model.safetensors in output_dir without the reward
    head or a word, and exit status 0: the folder looked like a finished run. Here the run stops after step 3 of 5
    (checkpoint-2 written) and gets SIGINT, as a terminal's Ctrl-C sends it: the head of step 3 lies beside the
    student, a marker and the log say what was saved and how to resume, the status is 130, and the logged command
    resumes the run to its end, which removes the marker."""
    config = merged(base_config(short_assets, tmp_path), SHORT)
    out, path = Path(config["output_dir"]), write_config(tmp_path / "config.yml", config)
    run = Training(python_train(path), fault={"XKD_FAULT_STEP": "3"})
    run.wait_stopped()
    os.kill(run.proc.pid, signal.SIGINT)  # pending while stopped, handled as soon as it runs again
    os.kill(run.proc.pid, signal.SIGCONT)
    assert run.finish() == 130, run.output[-6000:]

    notice = (out / "XKD_INTERRUPTED.txt").read_text().strip()
    command = f"axolotl train {path} --resume-from-checkpoint {out / 'checkpoint-2'}"
    assert "interrupted (SIGINT) after 3 of 5 optimizer steps" in notice and f"`{command}`" in notice, notice
    assert notice in run.output
    assert all((out / name).is_file() for name in (*WEIGHTS, "xkd_reward_head.json"))
    head, _ = load_reward_head(out)  # whole and sealed; one step past checkpoint-2's
    assert not head.state_dict()["proj.weight"].equal(load_file(out / "checkpoint-2" / WEIGHTS[1])["proj.weight"])

    # The logged command, through the same module `axolotl train` launches.
    completed([sys.executable, WRAPPER, *shlex.split(command)[2:]])
    assert not (out / "XKD_INTERRUPTED.txt").exists()
    assert final_state(out)["global_step"] == SHORT["max_steps"]


# -- Teacher server -------------------------------------------------------------------------------------------------


def answered_posts(output: str) -> int:
    """Scoring requests a serve-teacher answered, from its access lines."""
    return len(re.findall(r'"POST /v1/completions" 200 positions=', output))


def server_config(assets: dict[str, Path], tmp: Path, url: str, **teacher) -> dict:
    """4 steps of 2 micro-batches, each batch one request (its 4 rows are far below request_tokens), sent when the
    batch is drawn (prefetch 0), so that no request is in flight while the test stops the run after a step."""
    config = merged(base_config(assets, tmp), {**SHORT, "max_steps": 4, "xkd": {"teacher": None}})
    config["xkd"]["teacher"] = {"source": "server", "base_url": url, "top_k": 8, "prefetch": 0, "timeout_s": 30,
                                **teacher}
    return config


@pytest.mark.soak
def test_teacher_server_restarted_within_the_retry_budget(short_assets, tmp_path):
    """The server is SIGKILLed after step 2; the run's next requests fail and are retried; a new server on the
    same port answers them. Every trained micro-batch got exactly one answer (none missing, none twice)."""
    port = free_port()
    first = TeacherServerProcess(short_assets["teacher"], "--num-threads", "1", port=port)
    config = server_config(short_assets, tmp_path, first.url, max_retries=6, retry_backoff_s=1.0)
    run = Training(python_train(write_config(tmp_path / "cfg.yml", config)), fault={"XKD_FAULT_STEP": "2"})
    try:
        run.wait_stopped()
        first.kill()
        os.kill(run.proc.pid, signal.SIGCONT)
        run.wait_for("retry 1 of 6", timeout=300)  # the server is down while the run asks
        second = TeacherServerProcess(short_assets["teacher"], "--num-threads", "1", port=port)
    except BaseException:
        run.proc.kill()
        first.kill()
        raise
    try:
        assert run.finish() == 0, run.output[-8000:]
    finally:
        second.stop()
    batches = config["max_steps"] * config["gradient_accumulation_steps"]
    assert answered_posts(first.output) == 2 * config["gradient_accumulation_steps"]
    assert answered_posts(first.output) + answered_posts(second.output) == batches
    assert [e["step"] for e in step_logs(Path(config["output_dir"]))] == [1, 2, 3, 4]


def test_teacher_server_gone_too_long_stops_the_run_after_saving(short_assets, tmp_path):
    """The server is SIGKILLed after step 2 and stays down past the retry budget: the run stops with an error
    naming the URL and the budget, after saving checkpoint-2 (XKDTrainer.train; no periodic checkpoint is due);
    resumed from it once a server is back, the run trains steps 3 and 4 and nothing twice."""
    port = free_port()
    first = TeacherServerProcess(short_assets["teacher"], "--num-threads", "1", port=port)
    config = server_config(short_assets, tmp_path, first.url, max_retries=2, retry_backoff_s=0.2)
    config["save_steps"] = 100
    run = Training(python_train(write_config(tmp_path / "cfg.yml", config)), fault={"XKD_FAULT_STEP": "2"})
    run.wait_stopped()
    first.kill()
    os.kill(run.proc.pid, signal.SIGCONT)
    assert run.finish() != 0
    out = Path(config["output_dir"])
    assert f"xkd.teacher.base_url={first.url}: POST /v1/completions" in run.output
    assert "failed after 3 attempt(s)" in run.output and "max_retries=2, retry_backoff_s=0.2" in run.output
    assert f"saved in {out / 'checkpoint-2'}" in run.output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert final_state(out)["global_step"] == 2 and (out / "checkpoint-2" / WEIGHTS[1]).is_file()
    assert [e["step"] for e in step_logs(out)] == [1, 2]

    second = TeacherServerProcess(short_assets["teacher"], "--num-threads", "1", port=port)
    try:
        completed(python_train(write_config(tmp_path / "resumed.yml", merged(
            config, {"resume_from_checkpoint": str(out / "checkpoint-2"), "save_steps": 2}))))
    finally:
        second.stop()
    assert [e["step"] for e in step_logs(out)] == [1, 2, 3, 4]
    assert answered_posts(first.output) + answered_posts(second.output) == 4 * 2
