"""`axolotl xkd precompute` killed midway and rerun, or launched on two processes, gives the same rows as one
uninterrupted process.

Every run here computes with one thread (OMP_NUM_THREADS=1, what torchrun gives each of its processes): with
another thread count, float sums reduce in another order and a float16 log-prob or a near-tie of the top-k order
can flip (docs/teachers.md says what two builds of one store may differ in)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import (
    ONE_THREAD,
    base_config,
    kill_when_stopped,
    precompute_args,
    run_cli,
    start_stopping_cli,
    with_first_rows,
    write_config,
)

pytestmark = pytest.mark.e2e

ROWS, PER_SHARD = 96, 8


def command(cfg: Path, out: Path) -> list[str]:
    return ["axolotl", *precompute_args(cfg, out, rows_per_shard=PER_SHARD, batch_size=1)]


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
    run_cli(command(cfg, tmp_path / "reference"), env=ONE_THREAD)
    return cfg, tmp_path / "reference"


def test_two_process_precompute_writes_the_same_rows(reference, tmp_path):
    """Under torchrun, rank r takes shards r, r + 2, ...; together they are the single process's store."""
    cfg, want = reference
    got = tmp_path / "two_ranks"
    args = command(cfg, got)[1:]
    run_cli(["torchrun", "--nproc_per_node", "2", "-m", "axolotl.cli.main", *args], env=ONE_THREAD)
    assert_same_shards(got, want)


def test_killed_precompute_resumes_to_identical_rows(reference, tmp_path):
    """Killed right after its third shard (the process stops itself there; see tests.support.HOOKED_CLI), then
    rerun: the rerun keeps those three shards, writes the rest, and the store equals the uninterrupted one."""
    cfg, reference = reference
    resumed = tmp_path / "resumed"
    proc = start_stopping_cli(command(cfg, resumed)[1:], 3, env=ONE_THREAD)
    assert kill_when_stopped(proc), f"precompute exited ({proc.returncode}) before writing 3 shards"
    assert sorted(p.name for p in (resumed / "train").glob("shard-*")) == [f"shard-{i:05d}" for i in range(3)]

    result = run_cli(command(cfg, resumed), env=ONE_THREAD)
    assert "k=8" in result.stdout
    assert_same_shards(resumed, reference)
