"""`axolotl xkd precompute` killed midway and rerun gives the same rows as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.support import BIN, ENV, REPO, base_config, run_cli, write_config

ROWS, PER_SHARD = 96, 8


def command(cfg: Path, out: Path) -> list[str]:
    return ["axolotl", "xkd", "precompute", str(cfg), "--out", str(out), "--top-k", "8", "--batch-size", "1",
            "--rows-per-shard", str(PER_SHARD)]


def test_killed_precompute_resumes_to_identical_rows(tiny_assets, tmp_path):
    from datasets import load_from_disk

    data = tmp_path / "data"
    data.mkdir()
    lines = (tiny_assets["data"] / "train.jsonl").read_text().splitlines()[:ROWS]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = write_config(tmp_path / "cfg.yml", base_config({**tiny_assets, "data": data}, tmp_path))
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_cli(command(cfg, reference))

    env = {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    args = command(cfg, resumed)
    proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = resumed / "train" / "shard-00000"
    deadline = time.time() + 600
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (resumed / "train").glob("shard-*"))
    assert first.is_dir() and len(done) < ROWS // PER_SHARD - 1, f"not interrupted midway: {done}"

    result = run_cli(command(cfg, resumed))
    assert "k=8" in result.stdout
    rows = json.loads((reference / "manifest.json").read_text())["splits"]["train"]
    shards = -(-rows // PER_SHARD)
    for index in range(shards):
        name = f"shard-{index:05d}"
        got = load_from_disk(str(resumed / "train" / name)).to_dict()
        want = load_from_disk(str(reference / "train" / name)).to_dict()
        assert got == want, name
    assert sorted(p.name for p in (resumed / "train").iterdir() if p.name.startswith("shard-")) == [
        f"shard-{i:05d}" for i in range(shards)
    ]
