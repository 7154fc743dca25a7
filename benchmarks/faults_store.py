"""The `store` case of `python -m benchmarks.faults`: `axolotl xkd precompute` killed again and again, resumed
each time, then compared with an uninterrupted build shard by shard (content sha256).

Kills alternate between the two kinds the CI test (tests/e2e/test_faults_store.py) uses a few of: SIGSTOP at a
seeded shard (after it is complete, or while its files sit in its tmp folder) then SIGKILL, and SIGKILL at a
seeded random moment of the run (start-up, scoring, writing: wherever it lands), drawn below the time the rest of
the build takes so that it lands before the run ends. Every run computes with one thread,
so that equal means equal bytes.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.harness import (
    BIN,
    ENV,
    ONE_THREAD,
    REPO,
    base_config,
    kill_when_stopped,
    precompute_args,
    run_cli,
    start_stopping_cli,
    with_first_rows,
    write_config,
)


def _command(cfg: Path, out: Path, per_shard: int) -> list[str]:
    return precompute_args(cfg, out, rows_per_shard=per_shard)


def _shard_hashes(out: Path) -> dict[str, str]:
    from axolotl_xkd.integrity import folder_sha256

    return {f"train/{p.name}": folder_sha256(p) for p in sorted((out / "train").glob("shard-*"))}


def _kill_at_random_moment(args: list[str], seconds: float) -> bool:
    """Start `axolotl ARGS`, SIGKILL its session after `seconds`; False if it had finished by then."""
    env = {**os.environ, **ENV, **ONE_THREAD, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "axolotl"), *args], env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def store_case(args: argparse.Namespace) -> str:
    """Run the soak; returns the markdown section of benchmarks/results/faults.md."""
    import torch

    from axolotl_xkd.store.format import Manifest
    from axolotl_xkd.tiny import build_all

    work = Path(tempfile.mkdtemp(prefix="xkd_faults_store_"))
    assets = with_first_rows(build_all(work / "tiny", teacher_steps=100), work / "data", args.rows)
    cfg = write_config(work / "cfg.yml", base_config(assets, work))
    started = time.monotonic()
    run_cli(["axolotl", *_command(cfg, work / "reference", args.rows_per_shard)], env=ONE_THREAD)
    full_run_s = time.monotonic() - started
    want = _shard_hashes(work / "reference")
    out, rng, kills = work / "store", random.Random(args.seed), []
    for k in range(args.kills):
        shards_before = len(list((out / "train").glob("shard-*"))) if out.exists() else 0
        if k % 2 == 0:
            point, n = rng.choice(["written", "saved"]), rng.randint(1, 3)
            landed = kill_when_stopped(start_stopping_cli(_command(cfg, out, args.rows_per_shard), n, point=point,
                                                          env=ONE_THREAD))
            how = f"SIGKILL when stopped {'after' if point == 'written' else 'inside'} its shard #{n}"
        else:
            # A resumed run with r of the n shards left takes about full_run_s * r / n or more (start-up included);
            # a moment drawn below half of that lands while it runs, wherever (start-up, scoring, writing), on a
            # machine whose load varies.
            left = (len(want) - shards_before) / len(want)
            seconds = rng.uniform(1.0, max(1.5, 0.5 * full_run_s * left))
            landed = _kill_at_random_moment(_command(cfg, out, args.rows_per_shard), seconds)
            how = f"SIGKILL {seconds:.1f} s after start"
        tmp = sorted(p.name for p in (out / "train").glob(".tmp-*")) if (out / "train").exists() else []
        shards = len(list((out / "train").glob("shard-*"))) if out.exists() else 0
        kills.append((how, landed, shards_before, shards, tmp))
        print(f"kill {k + 1}: {how}: {'landed' if landed else 'run had finished'}, shards {shards_before} -> "
              f"{shards}, tmp left {tmp}", flush=True)
    run_cli(["axolotl", *_command(cfg, out, args.rows_per_shard)], env=ONE_THREAD)
    got = _shard_hashes(out)
    recorded = Manifest.read(out).shard_sha256
    lost = sorted(set(want) - set(got))
    differ = sorted(key for key in want if key in got and got[key] != want[key])
    extra = sorted(set(got) - set(want))
    leftovers = sorted(p.name for p in out.rglob(".*") if p.name != ".xkd.lock")
    landed = sum(landed for _, landed, *_ in kills)
    lines = [
        "## Store: precompute killed repeatedly",
        "",
        f"`python -m benchmarks.faults --cases store --kills {args.kills} --rows {args.rows} "
        f"--rows-per-shard {args.rows_per_shard} --seed {args.seed}`",
        "",
        f"- {datetime.now(UTC).isoformat(timespec='seconds')}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}; `axolotl xkd precompute` (tiny teacher, axolotl_xkd.tiny) "
        f"over {args.rows} rows, {len(want)} shards of {args.rows_per_shard} rows, OMP_NUM_THREADS=1; an "
        f"uninterrupted build took {full_run_s:.0f} s",
        f"- injected: {args.kills} kills, each followed by a rerun of the same command (the next kill's run, then "
        "a last one): every other one SIGSTOP at a seeded shard (complete, or still in its tmp folder) then "
        "SIGKILL, the others SIGKILL at a seeded moment of the run",
        f"- **{landed} kills landed mid-run**; the finished store: **{len(want) - len(lost) - len(differ)} of "
        f"{len(want)} shards equal the uninterrupted build by sha256, {len(lost)} lost, {len(differ)} differing, "
        f"{len(extra)} extra**; manifest hashes match the shards: {recorded == got}; tmp files left: "
        f"{len(leftovers)}",
        "",
        "| kill | how | landed mid-run | shards before -> after | tmp folders left (cleared by the rerun) |",
        "|---|---|---|---|---|",
        *[f"| {i + 1} | {how} | {'yes' if hit else 'no (run had finished)'} | {a} -> {b} | {', '.join(tmp) or '-'} |"
          for i, (how, hit, a, b, tmp) in enumerate(kills)],
        "",
        f"Survived: {len(want) - len(lost) - len(differ)} of {len(want)} shards; lost: {len(lost) + len(differ)}.",
    ]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The store case's options of `python -m benchmarks.faults`."""
    parser.add_argument("--kills", type=int, default=12, help="store: kills before the last rerun")
    parser.add_argument("--rows", type=int, default=384, help="store: training rows precomputed")
    parser.add_argument("--rows-per-shard", type=int, default=8, help="store: rows per shard")
    parser.add_argument("--seed", type=int, default=0, help="store and training: seed of the kill points")
