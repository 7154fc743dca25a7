"""Early checks of the places a config or a command names: a teacher model (a local folder or a hub id), a
precomputed store, and data files that hold no rows. A wrong one then fails before any work, with an error naming the
key, instead of Hugging Face's "Repo id must be in the form ..." after the dataset was prepared and the student
loaded (or the JSON loader's bare StopIteration on an empty file).

Run by the plugin's first training hook and by the `axolotl xkd` commands, not by the config schema: the config is
also validated where these places need not exist yet (`axolotl xkd precompute` writes the store its config names;
`axolotl preprocess` and `merge-lora` never read the teacher). The server URL's form is the schema's check
(args.py). Imports the standard library; huggingface_hub and the store format inside the checks.
"""

from __future__ import annotations

import os
from pathlib import Path


def check_model_location(value: str, key: str) -> None:
    """Raise unless `value` (given as `key`) is a local folder, or a Hugging Face hub id that from_pretrained can
    fetch: with HF_HUB_OFFLINE set, one already in the local hub cache."""
    if os.path.isdir(value):
        return
    if os.path.exists(value):
        raise ValueError(f"{key}={value!r} is a file; point it at a model folder (with config.json) or a hub id.")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        if value.startswith("~"):
            where = " (~ is not expanded: write the full path)"
        else:
            where = "" if os.path.isabs(value) else f" (read from {os.getcwd()})"
        raise ValueError(
            f"{key}={value!r} is not a folder on this machine{where}, nor a Hugging Face hub id (org/name); "
            "point it at the model's folder."
        ) from None
    if offline() and not in_hub_cache(value):
        raise ValueError(
            f"{key}={value!r} is not a folder on this machine, and as a hub id it is not in the local hub cache "
            f"({hub_cache()}) while HF_HUB_OFFLINE is set; download it first (`hf download {value}`, with network) "
            f"or point {key} at a local folder."
        )


def check_store(value: str, key: str, *, store_format: str) -> None:
    """Raise unless `value` (given as `key`) holds precomputed teacher data: a folder with the manifest that
    `axolotl xkd precompute` writes (store_format "xkd"), or an existing folder or file (axolotl_kd_v2)."""
    from axolotl_xkd.store.format import MANIFEST

    if store_format != "xkd":
        if not os.path.exists(value):
            raise ValueError(f"{key}={value!r} (format {store_format}) does not exist; point it at the dataset "
                             "(a folder saved with save_to_disk, or a .jsonl/.json/.parquet file).")
        return
    if not (Path(value) / MANIFEST).is_file():
        found = "is not a folder" if not os.path.isdir(value) else f"has no {MANIFEST}"
        raise ValueError(
            f"{key}={value!r} {found}: it is not a store written by `axolotl xkd precompute`. Run "
            f"`axolotl xkd precompute CONFIG.yml --out {value}` first (or set xkd.teacher.format: axolotl_kd_v2 for "
            "a dataset with target_token_ids/logprobs columns)."
        )


def check_teacher(teacher, *, training: bool, where: str = "xkd.teacher") -> None:
    """The places of a teacher block (args.py's ModelTeacher / PrecomputedTeacher / ServerTeacher, found at `where`)
    that a run reads: the store always (it is the training data, also for `axolotl preprocess`); a model's path and
    tokenizer_path (a model's, or a server's of another tokenizer) when training."""
    source = getattr(teacher, "source", None)
    if source == "precomputed":
        check_store(teacher.path, f"{where}.path", store_format=teacher.format)
    elif source == "model" and training:
        check_model_location(teacher.path, f"{where}.path")
    if source in ("model", "server") and training and teacher.tokenizer_path is not None:
        check_model_location(teacher.tokenizer_path, f"{where}.tokenizer_path")


def check_data_files(cfg) -> None:
    """Raise when a local file under `datasets:` or `test_datasets:` holds no rows (empty, or blank lines only):
    Hugging Face's JSON loader ends on such a file with a bare StopIteration that names neither file nor key."""
    for key in ("datasets", "test_datasets"):
        for index, dataset in enumerate(cfg.get(key) or ()):
            path = dataset.get("path") if hasattr(dataset, "get") else getattr(dataset, "path", None)
            if isinstance(path, str) and os.path.isfile(path) and _blank(path):
                raise ValueError(
                    f"{key}[{index}].path={path!r} is empty: it holds no rows. Write the rows into it (for .jsonl, "
                    f"one JSON object per line), point the path at the file that has them, or remove the entry."
                )


def _blank(path: str, limit: int = 1 << 20) -> bool:
    """Whether the file at `path` holds only whitespace (read up to `limit` bytes: a larger file is not blank)."""
    if os.path.getsize(path) > limit:
        return False
    with open(path, "rb") as file:
        return not file.read().strip()


def offline() -> bool:
    """Whether Hugging Face downloads are off (HF_HUB_OFFLINE), as from_pretrained sees it."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def hub_cache() -> Path:
    """The local hub cache from_pretrained reads (HF_HUB_CACHE, else under HF_HOME)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def in_hub_cache(repo_id: str) -> bool:
    """Whether a snapshot of the model repository `repo_id` is in the local hub cache."""
    from huggingface_hub.file_download import repo_folder_name

    snapshots = hub_cache() / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())
