"""Routed training data (`xkd.mixture: route`): each row's teacher, read from its raw `xkd.route_column` while Axolotl
tokenizes the row, kept as a per-token column (`keys.ROUTE`, the teacher's index in `xkd.teachers`) so it survives
Axolotl's filtering, packing and padding like its own per-token columns.

Axolotl's tokenization drops every raw column, so the plugin's `load_datasets` hook runs Axolotl's own dataset
preparation with each prompt strategy's `tokenize_prompt` wrapped to add the column; the prepared data is cached in
a folder of its own per routing (names, column, default), so a cache prepared without routing, or with other
teachers, is never read. Imports Axolotl inside the functions; nothing of the trainer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from axolotl_xkd.keys import ROUTE

DEFAULT_PREPARED = "last_run_prepared"
"""Axolotl's dataset_prepared_path when the config sets none."""


class RouteError(ValueError):
    """A row names no teacher (or the column is missing); the message names the row and what to do."""


class RoutedTokenizer:
    """A prompt strategy's `tokenize_prompt` that also writes each row's teacher index under `keys.ROUTE`, one per
    token (a batched strategy gets a list of rows)."""

    def __init__(self, tokenize: Callable, *, column: str, names: list[str], default: str | None,
                 batched: bool) -> None:
        self.tokenize, self.column, self.names, self.default, self.batched = tokenize, column, names, default, batched

    def __call__(self, prompt: dict) -> dict:
        if self.column not in prompt:
            raise RouteError(f"xkd.route_column {self.column!r} is not a column of the dataset (its columns: "
                             f"{sorted(prompt)}); add the column naming each row's teacher (one of {self.names}), or "
                             "set xkd.route_column to the column that does")
        out = self.tokenize(prompt)
        if not self.batched:
            out[ROUTE] = [self.index(prompt[self.column], prompt)] * len(out["input_ids"])
            return out
        values = prompt[self.column]
        if len(values) != len(out["input_ids"]):
            raise RouteError(f"the prompt strategy made {len(out['input_ids'])} rows of {len(values)}, so each row's "
                             f"teacher ({self.column!r}) cannot be told; use a strategy that keeps one row per example")
        out[ROUTE] = [[self.index(v, None)] * len(ids) for v, ids in zip(values, out["input_ids"])]
        return out

    def index(self, value, row: dict | None) -> int:
        """The teacher index a row's value names (the default teacher's for a value naming none)."""
        if value in self.names:
            return self.names.index(value)
        if self.default is not None:
            return self.names.index(self.default)
        shown = "" if row is None else f" (row {json.dumps(row, default=str)[:200]})"
        raise RouteError(f"a row's {self.column!r} is {value!r}{shown}, which names no teacher of xkd.teachers "
                         f"{self.names}; correct the row, or set xkd.default_teacher to train such rows with one")


@contextmanager
def routed_tokenization(column: str, names: list[str], default: str | None):
    """While open, every prompt strategy Axolotl tokenizes with (`TokenizedPromptDataset`) adds the route column."""
    from axolotl.datasets import TokenizedPromptDataset

    original = TokenizedPromptDataset.process

    def process(self, dataset):
        strategy = self.prompt_tokenizer
        strategy.tokenize_prompt = RoutedTokenizer(strategy.tokenize_prompt, column=column, names=names,
                                                   default=default, batched=bool(strategy.supports_batched))
        return original(self, dataset)

    TokenizedPromptDataset.process = process
    try:
        yield
    finally:
        TokenizedPromptDataset.process = original


def load_routed_datasets(cfg, *, column: str, names: list[str], default: str | None):
    """Axolotl's TrainDatasetMeta for `cfg`, each row with its teacher's index per token; refuses data that lacks it."""
    from axolotl.common.datasets import load_datasets

    key = json.dumps({"column": column, "names": names, "default": default}, sort_keys=True)
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
