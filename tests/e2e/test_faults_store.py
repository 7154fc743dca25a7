"""Faults of `axolotl xkd precompute` (issue 25, items 3 and 6): killed again and again at seeded points, or writing
onto a disk that fills up, the real CLI resumes to a store equal, shard by shard (content sha256), to an
uninterrupted build. The long version (more kills, random moments) is `python -m benchmarks.faults --cases store`.

Every run computes with one thread, as in test_precompute_resume.py, so that equal means equal bytes."""

from __future__ import annotations

import contextlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from axolotl_xkd.integrity import folder_sha256
from axolotl_xkd.store.format import Manifest, check_shard, shard_key
from tests.support import (
    ONE_THREAD,
    base_config,
    kill_when_stopped,
    precompute_args,
    run_cli,
    run_disk_full_cli,
    start_stopping_cli,
    with_first_rows,
    write_config,
)

pytestmark = pytest.mark.e2e

ROWS, PER_SHARD = 96, 8


def command(cfg: Path, out: Path) -> list[str]:
    return precompute_args(cfg, out, rows_per_shard=PER_SHARD)


def store_hashes(folder: Path) -> dict[str, str]:
    """Every shard's content sha256, computed now; the manifest must have recorded the same ones."""
    manifest = Manifest.read(folder)
    found = {shard_key("train", i): folder_sha256(folder / "train" / f"shard-{i:05d}")
             for i in range(manifest.shards("train"))}
    assert manifest.shard_sha256 == found
    return found


def leftovers(folder: Path) -> list[str]:
    """Files a failed or killed write may leave: tmp folders of shards, tmp files of the manifest."""
    return sorted(p.name for p in folder.rglob(".*") if p.name != ".xkd.lock")


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(config, shard hashes of one uninterrupted build) on the first ROWS rows."""
    folder = tmp_path_factory.mktemp("faults_store")
    cfg = write_config(folder / "cfg.yml", base_config(with_first_rows(tiny_assets, folder / "data", ROWS), folder))
    run_cli(["axolotl", *command(cfg, folder / "reference")], env=ONE_THREAD)
    return cfg, store_hashes(folder / "reference")


@pytest.mark.soak  # three precompute kills and resumes: `python -m benchmarks.faults --cases training` runs it
def test_precompute_killed_repeatedly_resumes_to_the_uninterrupted_store(reference, tmp_path):
    """Three SIGKILLs, each at a seeded shard: after a complete shard, or while a shard's files sit in its tmp
    folder (not yet hashed nor renamed); then a rerun finishes the store. Nothing lost, nothing duplicated."""
    cfg, want = reference
    out, rng = tmp_path / "store", random.Random(0)
    for point in ("saved", "written", "saved"):
        proc = start_stopping_cli(command(cfg, out), rng.randint(1, 3), point=point, env=ONE_THREAD)
        assert kill_when_stopped(proc), f"precompute exited ({proc.returncode}) before the kill point"
    assert len(list((out / "train").glob("shard-*"))) < ROWS // PER_SHARD
    run_cli(["axolotl", *command(cfg, out)], env=ONE_THREAD)
    assert store_hashes(out) == want
    assert leftovers(out) == []


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[bool]:
    """A tmpfs of `size` mounted on `folder` (yields True), or nothing where this process may not mount (False)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def test_precompute_on_a_full_disk_names_the_path_and_resumes_once_space_is_back(reference, tmp_path):
    """The store's disk fills up midway: a real 64 KiB tmpfs where this process may mount one (root), else a
    write wrapper in the precompute process raising ENOSPC from the third shard on (tests.support.HOOKED_CLI). The
    error names the shard and says what to do; nothing half-written is left (no tmp folder or file, the manifest
    and every shard on disk check out against their hashes); with space back, the same command finishes the store
    and it equals the uninterrupted one."""
    cfg, want = reference
    out = tmp_path / "disk" / "store"
    with small_disk(tmp_path / "disk", "64k") as real:
        failed = (run_cli(["axolotl", *command(cfg, out)], env=ONE_THREAD, check=False) if real
                  else run_disk_full_cli(command(cfg, out), 3, env=ONE_THREAD))
        assert failed.returncode != 0
        assert "No space left on device" in failed.stderr and "writing failed" in failed.stderr
        assert f"{out}/train/shard-" in failed.stderr and "rerun the same `axolotl xkd precompute`" in failed.stderr
        assert leftovers(out) == []
        manifest = Manifest.read(out)
        done = sorted(int(p.name.split("-")[1]) for p in (out / "train").glob("shard-*"))
        assert len(done) < manifest.shards("train")
        assert all(check_shard(out, manifest, "train", i) for i in done)
        if real:  # space is back (the wrapper's disk fills up only in the process it wraps)
            subprocess.run(["mount", "-o", "remount,size=16m", str(tmp_path / "disk")], check=True)
        run_cli(["axolotl", *command(cfg, out)], env=ONE_THREAD)
        assert store_hashes(out) == want
