"""Damaged files are refused, never trained on, and failed writes leave nothing half-written (issue 25, items 4
and 6): a store's shards and manifest, and a saved reward head, on real files with real flipped bytes and
truncations; a full disk through a write wrapper in this process (ENOSPC from the n-th byte on)."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from axolotl_xkd import integrity
from axolotl_xkd.integrity import CorruptFileError
from axolotl_xkd.keys import TOPK_IDS, TOPK_LOGPROBS
from axolotl_xkd.losses.reward_head import VariationalRewardHead
from axolotl_xkd.reward_store import CONFIG_NAME, WEIGHTS_NAME, load_reward_head, save_beside_student
from axolotl_xkd.store.format import MANIFEST, Manifest
from axolotl_xkd.store.read import load_split
from axolotl_xkd.store.write import write_shard

V, K = 50, 2


def rows(n: int) -> pa.Table:
    """n valid rows of 4 tokens, 2 response positions each (split encoding, float32 log-probs)."""
    lps = [float(np.log(0.5)), float(np.log(0.25))] * 2
    return pa.table({"input_ids": pa.array([[7, 8, 9, 10]] * n, pa.list_(pa.int32())),
                     "labels": pa.array([[-100, -100, 9, 10]] * n, pa.list_(pa.int32())),
                     TOPK_IDS: pa.array([[1, 2, 3, 4]] * n, pa.list_(pa.int32())),
                     TOPK_LOGPROBS: pa.array([lps] * n, pa.list_(pa.float32()))})


def make_store(folder: Path) -> Path:
    """A finished two-shard store, written by the precompute's own writer (hashes recorded as shards land)."""
    from datasets import Dataset

    Manifest(teacher="t", tokenizer_hash="h", vocab_size=V, top_k=K, sequence_len=8, encoding="split",
             logprob_dtype="float32", rows_per_shard=3, splits={"train": 6}).write(folder)
    for index in range(2):
        write_shard(Dataset(rows(3)), folder, "train", index)
    return folder


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_intact_store_loads_and_records_every_shard(tmp_path):
    folder = make_store(tmp_path)
    manifest = Manifest.read(folder)
    assert sorted(manifest.shard_sha256) == ["train/shard-00000", "train/shard-00001"]
    assert len(load_split(folder, manifest, "train")) == 6


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_damaged_shard_is_refused_naming_it(tmp_path, damage):
    folder = make_store(tmp_path)
    arrow = next((folder / "train" / "shard-00001").glob("*.arrow"))
    damage(arrow)
    with pytest.raises(CorruptFileError, match=r"train/shard-00001 is damaged: its sha256 .* recorded in .*"
                       r"manifest.json .*Delete .*shard-00001 and rerun the same `axolotl xkd precompute`"):
        load_split(folder, Manifest.read(folder), "train")


def test_damaged_manifest_is_refused_naming_it(tmp_path):
    folder = make_store(tmp_path)
    path = folder / MANIFEST
    path.write_text(path.read_text().replace('"top_k": 2', '"top_k": 3'))  # still valid JSON, one byte changed
    with pytest.raises(CorruptFileError, match=rf"{path} is damaged \(its content no longer matches.*Delete"):
        Manifest.read(folder)
    truncate(path)
    with pytest.raises(CorruptFileError, match=rf"{path} is damaged \(not valid JSON"):
        Manifest.read(folder)


def test_store_written_before_hashes_loads_with_a_warning(tmp_path, caplog):
    folder = make_store(tmp_path)
    data = json.loads((folder / MANIFEST).read_text())
    del data["sha256"], data["shard_sha256"]
    (folder / MANIFEST).write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="axolotl_xkd"):
        assert len(load_split(folder, Manifest.read(folder), "train")) == 6
    assert "has no content hashes" in caplog.text and "2 of 2 shards" in caplog.text


def saved_head(folder: Path, seed: int = 0) -> VariationalRewardHead:
    torch.manual_seed(seed)
    head = VariationalRewardHead(16, metadata={"reward_input": "next_state"})
    torch.nn.init.normal_(head.proj.weight)
    save_beside_student(head, folder)
    return head


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME])
@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_damaged_reward_head_is_refused_naming_the_file(tmp_path, name, damage):
    saved_head(tmp_path)
    damage(tmp_path / name)
    with pytest.raises(CorruptFileError, match=rf"{tmp_path / name} is damaged.*resume from another checkpoint-N"):
        load_reward_head(tmp_path)


def test_reward_head_saved_before_hashes_loads_with_a_warning(tmp_path, caplog):
    head = saved_head(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["sha256"], config["weights_sha256"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="axolotl_xkd"):
        loaded, _ = load_reward_head(tmp_path)
    assert "has no content hashes" in caplog.text
    torch.testing.assert_close(loaded.proj.weight, head.proj.weight, rtol=0, atol=0)


@pytest.fixture()
def disk_full_after(monkeypatch):
    """`full(n)`: from now on, files that integrity.atomic_write writes fail with ENOSPC after n bytes (their first
    n bytes are written, as on a disk that fills up); the store's lock file opens as usual."""

    def full(n: int) -> None:
        real_open = open

        class FillingFile:
            def __init__(self, path, mode):
                self.handle = real_open(path, mode)

            def write(self, data: bytes) -> int:
                self.handle.write(data[:n])
                if len(data) > n:
                    raise OSError(errno.ENOSPC, "No space left on device", self.handle.name)
                return len(data)

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.handle.close()

        def filling_open(path, mode="r", *args, **kwargs):
            return FillingFile(path, mode) if "w" in mode else real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(integrity, "open", filling_open, raising=False)

    return full


def test_reward_head_save_on_a_full_disk_keeps_the_last_head(tmp_path, disk_full_after):
    """The save fails with an error naming the folder; the last saved head is what loads (nothing half-written:
    no tmp file, no partial weights); once space is back the save goes through."""
    first = saved_head(tmp_path, seed=0)
    disk_full_after(100)
    with pytest.raises(OSError, match=rf"{tmp_path}: saving the X-KD reward head failed \(No space left on device"):
        saved_head(tmp_path, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    torch.testing.assert_close(load_reward_head(tmp_path)[0].proj.weight, first.proj.weight, rtol=0, atol=0)
    disk_full_after(1 << 30)  # space is back
    second = saved_head(tmp_path, seed=1)
    torch.testing.assert_close(load_reward_head(tmp_path)[0].proj.weight, second.proj.weight, rtol=0, atol=0)


def test_manifest_write_on_a_full_disk_keeps_the_last_manifest(tmp_path, disk_full_after):
    from datasets import Dataset

    folder = make_store(tmp_path)
    before = (folder / MANIFEST).read_text()
    (folder / "train" / "shard-00001").rename(folder / "train" / "gone")
    disk_full_after(10)
    with pytest.raises(OSError, match=r"train/shard-00001: writing failed \(No space left on device.*rerun the same"):
        write_shard(Dataset(rows(3)), folder, "train", 1)
    assert (folder / MANIFEST).read_text() == before
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["gone", "shard-00000"]
    assert not list(folder.glob(f".{MANIFEST}*"))
