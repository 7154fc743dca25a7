"""Content hashes and atomic writes for the files the plugin saves (the store's shards and manifest, the reward
head), so that a damaged file is refused instead of trained on, and a failed write leaves nothing half-written.

A file damaged after it was written (a flipped byte, a truncated copy) no longer matches the sha256 recorded when it
was written; a JSON file carries its own hash (`seal_json`). A write goes to a tmp file beside its target and is
renamed over it only when complete, so a write that fails (a full disk) or is killed leaves the old file, or none.
A leaf: the standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

HASH_KEY = "sha256"
_CHUNK = 1 << 20


class CorruptFileError(ValueError):
    """A file whose content does not match what was written (the message names the file and what to do)."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_sha256(folder: str | os.PathLike) -> str:
    """Hex sha256 of every file under `folder`: relative names, sizes and bytes, in name order (so a file
    renamed, added, removed or truncated changes it, as a changed byte does)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _canonical(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


def seal_json(data: dict) -> str:
    """`data` as JSON text carrying its own hash under HASH_KEY (the sha256 of the text without it)."""
    body = {k: v for k, v in data.items() if k != HASH_KEY}
    return _canonical({**body, HASH_KEY: hashlib.sha256(_canonical(body).encode()).hexdigest()})


def read_sealed_json(path: str | os.PathLike, *, advice: str) -> tuple[dict, bool]:
    """(content without HASH_KEY, whether it carried a hash) of a JSON file written with `seal_json`.

    CorruptFileError, naming `path` and followed by `advice`, when the text is not JSON (truncated) or does not
    match its hash (changed); a file without a hash (written before hashes existed) is returned unchecked.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path} is damaged (not valid JSON: {error}); {advice}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} is damaged (a JSON {type(data).__name__}, not an object); {advice}")
    if HASH_KEY not in data:
        return data, False
    recorded = data.pop(HASH_KEY)
    if hashlib.sha256(_canonical(data).encode()).hexdigest() != recorded:
        raise CorruptFileError(f"{path} is damaged (its content no longer matches the sha256 it was written with); "
                               f"{advice}")
    return data, True


def check_sha256(path: str | os.PathLike, recorded: str, *, where: str, advice: str) -> None:
    """CorruptFileError unless the file or folder at `path` hashes to `recorded` (the hash `where` holds)."""
    path = Path(path)
    found = folder_sha256(path) if path.is_dir() else file_sha256(path)
    if found != recorded:
        raise CorruptFileError(f"{path} is damaged: its sha256 {found[:12]}... differs from the {recorded[:12]}... "
                               f"recorded in {where} when it was written (a changed byte, a truncated or partial "
                               f"copy); {advice}")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` through a tmp file in the same folder and one rename: `path` holds the old content or
    the new, never part of it. On failure (e.g. ENOSPC) the tmp file is removed and the OSError raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (a `.xkd.lock` file in it), so processes sharing it (the ranks of one
    precompute) read-modify-write its files one at a time."""
    with open(Path(folder) / ".xkd.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
