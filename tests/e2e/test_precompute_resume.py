"""`axolotl xkd precompute` killed midway and rerun, or launched on two processes, gives the same rows as one
uninterrupted process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import BIN, ENV, REPO, base_config, run_cli, with_first_rows, write_config

pytestmark = pytest.mark.e2e

ROWS, PER_SHARD = 96, 8


def command(cfg: Path, out: Path) -> list[str]:
    return ["axolotl", "xkd", "precompute", str(cfg), "--out", str(out), "--top-k", "8", "--batch-size", "1",
            "--rows-per-shard", str(PER_SHARD)]


def assert_same_shards(got: Path, want: Path) -> None:
    """Both stores hold the same shards, row for row."""
    from datasets import load_from_disk

    rows = json.loads((want / "manifest.json").read_text())["splits"]["train"]
    shards = [f"shard-{i:05d}" for i in range(-(-rows // PER_SHARD))]
    for name in shards:
        assert load_from_disk(str(got / "train" / name)).to_dict() == load_from_disk(str(want / "train" / name)).to_dict(), name
    assert sorted(p.name for p in (got / "train").iterdir() if p.name.startswith("shard-")) == shards


@pytest.fixture()
def reference(tiny_assets, tmp_path) -> tuple[Path, Path]:
    """(config, store of one uninterrupted process) on the first ROWS rows."""
    cfg = write_config(tmp_path / "cfg.yml", base_config(with_first_rows(tiny_assets, tmp_path / "data", ROWS), tmp_path))
    run_cli(command(cfg, tmp_path / "reference"))
    return cfg, tmp_path / "reference"


def test_two_process_precompute_writes_the_same_rows(reference, tmp_path):
    """Under torchrun, rank r takes shards r, r + 2, ...; together they are the single process's store."""
    cfg, want = reference
    got = tmp_path / "two_ranks"
    args = command(cfg, got)[1:]
    run_cli(["torchrun", "--nproc_per_node", "2", "-m", "axolotl.cli.main", *args])
    assert_same_shards(got, want)


def test_killed_precompute_resumes_to_identical_rows(reference, tmp_path):
    cfg, reference = reference
    resumed = tmp_path / "resumed"

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
    assert_same_shards(resumed, reference)
