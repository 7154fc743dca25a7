"""Routed training data (`xkd.mixture: route`): each row's teacher, named by its `datasets:` entry (`xkd_teacher:`)
or read from its raw `xkd.route_column` while Axolotl tokenizes the row, kept as a per-token column (`keys.ROUTE`,
the teacher's index in `xkd.teachers`) so it survives Axolotl's filtering, packing and padding like its own per-token
columns.

Axolotl's tokenization drops every raw column, and its config validation every key of a dataset entry it does not
know, so the plugin reads the entries' teachers from the raw config (`entry_teachers`, at `register`) and its
`load_datasets` hook runs Axolotl's own dataset preparation with each entry's teacher put back and each prompt
strategy's `tokenize_prompt` wrapped to add the column; the prepared data is cached in a folder of its own per routing
(names, column, default, entries), so a cache prepared without routing, or with other teachers, is never read.
Imports Axolotl inside the functions; nothing of the trainer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from axolotl_xkd.keys import ROUTE
from axolotl_xkd.options import ENTRY_TEACHER

DEFAULT_PREPARED = "last_run_prepared"
"""Axolotl's dataset_prepared_path when the config sets none."""
SPLITS = ("datasets", "test_datasets")
"""The config keys listing Axolotl's dataset entries."""
_entry: str | None = None
"""The teacher the dataset entry Axolotl is loading names (set around its `get_dataset_wrapper`)."""


class RouteError(ValueError):
    """A row names no teacher (or the column is missing); the message names the row and what to do."""


class RoutedTokenizer:
    """A prompt strategy's `tokenize_prompt` that also writes each row's teacher index under `keys.ROUTE`, one per
    token (a batched strategy gets a list of rows): the teacher its dataset entry names (`entry`), else the one its
    `column` names, else the default teacher."""

    def __init__(self, tokenize: Callable, *, column: str | None, names: list[str], default: str | None,
                 batched: bool, entry: str | None = None) -> None:
        self.tokenize, self.column, self.names, self.default, self.batched = tokenize, column, names, default, batched
        self.entry = entry

    def __call__(self, prompt: dict) -> dict:
        reads = self.entry is None and self.column is not None
        if reads and self.column not in prompt:
            raise RouteError(f"xkd.route_column {self.column!r} is not a column of the dataset (its columns: "
                             f"{sorted(prompt)}); add the column naming each row's teacher (one of {self.names}), "
                             f"set xkd.route_column to the column that does, or name the entry's teacher with "
                             f"`{ENTRY_TEACHER}:` in its `datasets:` entry")
        out = self.tokenize(prompt)
        if not self.batched:
            out[ROUTE] = [self.index(prompt[self.column] if reads else None, prompt)] * len(out["input_ids"])
            return out
        values = prompt[self.column] if reads else [None] * len(out["input_ids"])
        if len(values) != len(out["input_ids"]):
            raise RouteError(f"the prompt strategy made {len(out['input_ids'])} rows of {len(values)}, so each row's "
                             f"teacher ({self.column!r}) cannot be told; use a strategy that keeps one row per example")
        out[ROUTE] = [[self.index(v, None)] * len(ids) for v, ids in zip(values, out["input_ids"])]
        return out

    def index(self, value, row: dict | None) -> int:
        """The teacher index of a row whose column holds `value` (the entry's teacher where it names one; the default
        teacher's for a value naming none)."""
        if self.entry is not None:
            return self.names.index(self.entry)
        if value in self.names:
            return self.names.index(value)
        if self.default is not None:
            return self.names.index(self.default)
        if self.column is None:
            raise RouteError(f"a dataset entry names no teacher and xkd.route_column is unset, so its rows have none; "
                             f"add `{ENTRY_TEACHER}: <name>` (one of {self.names}) to the entry, or set "
                             "xkd.route_column or xkd.default_teacher")
        shown = "" if row is None else f" (row {json.dumps(row, default=str)[:200]})"
        raise RouteError(f"a row's {self.column!r} is {value!r}{shown}, which names no teacher of xkd.teachers "
                         f"{self.names}; correct the row, or set xkd.default_teacher to train such rows with one")


def entry_teachers(cfg) -> dict[str, list[str | None]]:
    """The teacher each dataset entry of the raw (unvalidated) config names, per split key; empty where none does."""
    named = {}
    for split in SPLITS:
        entries = cfg.get(split) or []
        teachers = [entry.get(ENTRY_TEACHER) if isinstance(entry, dict) else None for entry in entries]
        if any(t is not None for t in teachers):
            named[split] = teachers
    return named


def check_entry_teachers(data: dict) -> None:
    """Refuse a dataset entry's `xkd_teacher` that no routed mixture reads or that names no teacher, and `route`
    with rows of no known teacher (no route_column, an entry naming none, no default teacher), naming the key. Axolotl
    drops unknown keys of a dataset entry before any validator of the plugin sees them, so the plugin's `register`
    hook runs this on the raw config."""
    xkd = data.get("xkd") if isinstance(data.get("xkd"), dict) else {}
    teachers = xkd.get("teachers") if isinstance(xkd.get("teachers"), list) else None
    names = [t.get("name") for t in teachers or [] if isinstance(t, dict)]
    routed = teachers is not None and xkd.get("mixture") == "route"
    unnamed = []
    for split in SPLITS:
        for i, entry in enumerate(data.get(split) or []):
            teacher = entry.get(ENTRY_TEACHER) if isinstance(entry, dict) else None
            if teacher is None:
                unnamed.append(f"{split}[{i}]")
            elif not routed:
                raise ValueError(f"{split}[{i}].{ENTRY_TEACHER} routes the entry's rows to a teacher, which only "
                                 "xkd.teachers with xkd.mixture: route reads; remove it, or set xkd.mixture: route")
            elif teacher not in names:
                raise ValueError(f"{split}[{i}].{ENTRY_TEACHER} {teacher!r} is not one of xkd.teachers' names {names}")
    if routed and unnamed and xkd.get("route_column") is None and xkd.get("default_teacher") is None:
        raise ValueError(f"xkd.mixture: route needs xkd.route_column, the dataset column that names each row's teacher "
                         f"(one of {names}), or `{ENTRY_TEACHER}: <name>` in each `datasets:` entry (without one: "
                         f"{', '.join(unnamed)}), or xkd.default_teacher for the rows of entries that name none")


@contextmanager
def routed_tokenization(column: str | None, names: list[str], default: str | None):
    """While open, every prompt strategy Axolotl tokenizes with (`TokenizedPromptDataset`) adds the route column,
    with the teacher of the dataset entry being loaded where it names one."""
    from axolotl.datasets import TokenizedPromptDataset
    from axolotl.utils.data import sft

    original, wrapper = TokenizedPromptDataset.process, sft.get_dataset_wrapper

    def process(self, dataset):
        strategy = self.prompt_tokenizer
        strategy.tokenize_prompt = RoutedTokenizer(strategy.tokenize_prompt, column=column, names=names,
                                                   default=default, batched=bool(strategy.supports_batched),
                                                   entry=_entry)
        return original(self, dataset)

    def get_dataset_wrapper(*args, dataset_config, **kwargs):
        global _entry
        _entry = dataset_config.get(ENTRY_TEACHER)
        try:
            return wrapper(*args, dataset_config=dataset_config, **kwargs)
        finally:
            _entry = None

    TokenizedPromptDataset.process, sft.get_dataset_wrapper = process, get_dataset_wrapper
    try:
        yield
    finally:
        TokenizedPromptDataset.process, sft.get_dataset_wrapper = original, wrapper


def load_routed_datasets(cfg, *, column: str | None, names: list[str], default: str | None,
                         entries: dict[str, list[str | None]] | None = None):
    """Axolotl's TrainDatasetMeta for `cfg`, each row with its teacher's index per token (`entries`: the teacher each
    dataset entry names, per split key, from the raw config); refuses data that lacks it."""
    from axolotl.common.datasets import load_datasets

    entries = entries or {}
    for split, teachers in entries.items():
        listed = cfg.get(split) or []
        if len(listed) != len(teachers):
            raise RouteError(f"{split}: Axolotl's validated config lists {len(listed)} entries but the YAML "
                             f"{len(teachers)}, so each entry's {ENTRY_TEACHER} cannot be matched; name the teachers "
                             "with xkd.route_column instead")
        for entry, teacher in zip(listed, teachers):
            entry[ENTRY_TEACHER] = teacher
    key = json.dumps({"column": column, "names": names, "default": default, "entries": entries}, sort_keys=True)
    base = cfg.get("dataset_prepared_path") or DEFAULT_PREPARED
    cfg["dataset_prepared_path"] = str(Path(base) / f"xkd-route-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    with routed_tokenization(column, names, default):
        meta = load_datasets(cfg=cfg)
    for split in (meta.train_dataset, meta.eval_dataset):
        if split is not None and ROUTE not in split.column_names:
            raise RouteError(f"the prepared dataset has no {ROUTE!r} column: it was not tokenized by Axolotl's prompt "
                             f"strategies (a pretraining or pre-tokenized dataset?); xkd.mixture: route needs rows "
                             "with a raw column naming their teacher")
    return meta
