"""Fault-injection soak, the longer runs behind the CI-sized fault tests (tests/e2e/test_faults.py,
tests/e2e/test_faults_store.py):

    python -m benchmarks.faults --cases server [--seconds 60] [--clients 32]
    python -m benchmarks.faults --cases store [--kills 12] [--rows 384] [--rows-per-shard 8] [--seed 0]
    python -m benchmarks.faults --cases training [--seed 0]
    python -m benchmarks.faults --cases random-kills [--seed 0] [--repeats 3]

Each case writes its own section of benchmarks/results/faults.md (between `<!-- case: NAME -->` and
`<!-- end: NAME -->`; other cases' sections are kept) and prints it.

- `server`: `axolotl xkd serve-teacher` (tiny teacher, axolotl_xkd.tiny, on 127.0.0.1, --num-threads 1) under
  `--clients` concurrent clients for `--seconds` (each client: the server teacher's own HTTP client, no retries,
  requests of 4 prompts x 24 tokens, top 20), then every kind of bad request, each followed by a good one:
  failures, p50 / p99 latency, tokens/s, and that the server still serves.
- `training`: every kill-and-resume case of tests/e2e/test_faults.py and test_faults_store.py, the `soak` ones
  included that `scripts/test.sh` leaves out (a precomputed run killed at its last step, a run killed three times
  at random steps drawn from `--seed` and resumed each time, one rank of two killed, a teacher server restarted
  within the retry budget, precompute killed three times), as a pytest run: each case holds or fails as in CI.
- `random-kills`: the repeated random-kill case alone, once per seed in --seed .. --seed + --repeats - 1.
- `store` (benchmarks/faults_store.py): `axolotl xkd precompute` killed `--kills` times at seeded points and
  resumed each time; the finished store compared with an uninterrupted build by sha256 per shard.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import faults_store
from benchmarks.harness import TeacherServerProcess, post_status
from benchmarks.server_load import run_load

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "faults.md"
HEADER = "# Fault-injection results\n\nEach section: what was injected, how often, what survived, what was lost.\n"


# -- server: load and bad requests ----------------------------------------------------------------------------------

def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    return post_status(url + "/v1/completions", body, headers)


# What each bad request sends (body, extra headers); the status the server must answer with.
_BAD = {
    "not JSON": (b'{"prompt": [1, 2', {}, 400),
    "not UTF-8": (b'{"prompt": "\xff\xfe"}', {}, 400),
    "wrong types": (json.dumps({"prompt": "text", "max_tokens": "1"}).encode(), {}, 400),
    "wrong model": (json.dumps({"model": "gpt-4", "prompt": [[1, 2]], "max_tokens": 1}).encode(), {}, 404),
    "too many positions": (json.dumps({"prompt": [[1] * 24] * 3000, "max_tokens": 1}).encode(), {}, 413),
}


def server_case(args: argparse.Namespace) -> str:
    import torch
    from transformers import AutoTokenizer

    from axolotl_xkd.tiny import build_model, build_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="xkd_faults_server_"))
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden=64, layers=2, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    load_average = os.getloadavg()[0]  # other work on the machine slows the clients and the server alike
    server = TeacherServerProcess(folder, "--num-threads", "1", "--served-model-name", "tiny")
    try:
        load = run_load(server.url, AutoTokenizer.from_pretrained(folder), clients=args.clients,
                        seconds=args.seconds)
        bad = {}
        for name, (body, headers, want) in _BAD.items():
            got = _post(server.url, body, {"Content-Type": "application/json", **headers})
            good = _post(server.url, json.dumps({"model": "tiny", "prompt": [[5, 6, 7]], "max_tokens": 1,
                                                 "prompt_logprobs": 2}).encode(), {})
            bad[name] = (want, got, good)
    finally:
        output = server.stop()
    summary = re.search(r"after (\d+) requests, (\d+) positions scored, (\d+) requests refused", output)
    if summary is None:
        raise SystemExit(f"serve-teacher printed no shutdown count; its output:\n{output[-4000:]}")
    requests, positions, refused = (int(g) for g in summary.groups())
    lines = [
        "## Server under load",
        "",
        f"`python -m benchmarks.faults --cases server --seconds {args.seconds:g} --clients {args.clients}`",
        "",
        f"- {datetime.now(UTC).isoformat(timespec='seconds')}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load_average:.1f} at the "
        "start; the clients and the server share this machine",
        f"- injected: {args.clients} concurrent clients for {args.seconds:g} s (each the server teacher's HTTP client, "
        f"no retries, {load.prompts} prompts x {load.prompt_tokens} tokens per request, top 20), on a tiny teacher "
        "(hidden 64, 2 layers) served with `--num-threads 1`",
        f"- **{load.answered} requests answered, {len(load.failures)} failed**; latency p50 "
        f"**{load.percentile_ms(50):.0f} ms**, p99 **{load.percentile_ms(99):.0f} ms** (queued behind one model); "
        f"**{load.tokens_per_s:.0f} prompt tokens/s** over {load.wall_s:.1f} s",
        f"- the server's own count at shutdown: {requests} requests ({refused} refused), {positions} positions "
        f"(= the answered load requests, each client's start-up GET /v1/models, and the bad and good requests below)",
        "",
        "| bad request | expected | answered | the next good request |",
        "|---|---|---|---|",
        *[f"| {name} | {want} | {got} | {good} |" for name, (want, got, good) in bad.items()],
        "",
        f"Survived: {sum(got == want and good == 200 for want, got, good in bad.values())} of {len(bad)} bad "
        f"requests answered as expected and followed by a served request; lost: {len(load.failures)} requests.",
    ]
    if load.failures:
        lines += ["", "First failures:", "", *[f"    {f[:300]}" for f in load.failures[:5]]]
    return "\n".join(lines) + "\n"


def training_case(args: argparse.Namespace) -> str:
    """The training fault cases (`soak` included) run by pytest; the section is its summary."""
    import subprocess

    started = datetime.now(UTC)
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "e2e", "-k",
               "killed or teacher_server", "tests/e2e/test_faults.py", "tests/e2e/test_faults_store.py"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "XKD_FAULT_SEED": str(args.seed)})
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    kills = re.findall(r"seed \d+: killed at steps \[[\d, ]*\]", proc.stdout)
    return (f"## Training killed, teacher server down\n\n`python -m benchmarks.faults --cases training --seed "
            f"{args.seed}` (`{' '.join(command[2:])}`)\n\n- {started.isoformat(timespec='seconds')}, "
            f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start\n"
            f"- pytest: **{summary}** (exit code {proc.returncode}); each case compares the resumed student and reward "
            "head with an uninterrupted run bit for bit, and counts teacher answers against training batches\n"
            f"- random kill points (XKD_FAULT_SEED={args.seed}): {'; '.join(kills) or 'none reported'}\n")


def random_kills_case(args: argparse.Namespace) -> str:
    """The repeated random-kill soak (three kills per run at seeded steps, resumed each time) for --repeats seeds
    from --seed; the section lists each seed's kill steps and whether the run ended bit for bit as the
    uninterrupted one."""
    import subprocess

    started = datetime.now(UTC)
    test = "tests/e2e/test_faults.py::test_killed_at_random_steps_again_and_again_resumes_to_the_uninterrupted_run"
    rows = []
    for seed in range(args.seed, args.seed + args.repeats):
        command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "soak", test]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "XKD_FAULT_SEED": str(seed)})
        kills = re.search(r"killed at steps (\[[\d, ]*\])", proc.stdout)
        rows.append(f"| {seed} | {kills[1] if kills else '(none reported)'} | "
                    f"{'yes' if proc.returncode == 0 else 'NO (exit code %d)' % proc.returncode} |")
    held = sum(row.endswith("| yes |") for row in rows)
    return "\n".join([
        "## Training killed at random steps, again and again", "",
        f"`python -m benchmarks.faults --cases random-kills --seed {args.seed} --repeats {args.repeats}` "
        f"(`pytest -m soak {test}` once per seed)", "",
        f"- {started.isoformat(timespec='seconds')}, {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the start",
        "- injected per seed: an 8-step X-KD run (in-process teacher, checkpoints every 2 steps) SIGKILLed three "
        "times, each at a step drawn uniformly after the newest checkpoint, each time resumed from that checkpoint; "
        "then resumed to the end",
        "- survived: the final student and reward head equal the uninterrupted run's bit for bit, and the log has "
        "steps 1-8 once each with the uninterrupted run's loss, grad_norm and xkd/* values", "",
        "| seed | kill steps | survived, nothing lost |", "|---|---|---|", *rows, "",
        f"Survived: {held} of {len(rows)} runs ({3 * len(rows)} kills); runs that lost something: "
        f"{len(rows) - held}.", ""])


CASES: dict[str, Callable[[argparse.Namespace], str]] = {"server": server_case, "store": faults_store.store_case,
                                                         "training": training_case, "random-kills": random_kills_case}


def write_section(name: str, section: str) -> None:
    """Replace (or add) case `name`'s section of RESULTS, keeping the others."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"<!-- case: {name} -->\n{section}<!-- end: {name} -->\n"
    pattern = re.compile(rf"<!-- case: {re.escape(name)} -->\n.*?<!-- end: {re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--seconds", type=float, default=60.0, help="server: how long the load runs")
    parser.add_argument("--clients", type=int, default=32, help="server: concurrent clients")
    parser.add_argument("--repeats", type=int, default=3, help="random-kills: seeds, from --seed")
    faults_store.add_arguments(parser)
    args = parser.parse_args()
    for name in args.cases:
        section = CASES[name](args)
        write_section(name, section)
        print(section)
    print(f"written to {RESULTS} ({' '.join(sys.argv[1:])})")


if __name__ == "__main__":
    main()
