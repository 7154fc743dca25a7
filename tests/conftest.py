"""Session fixtures: the tiny tokenizer, teacher, student and data set, built once in code.

`tiny_assets` trains the teacher (end-to-end tests); `untrained_assets` skips that, for tests that only need
loadable model folders (the fast tier, `pytest -m "not e2e"`, must never train a teacher).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import support  # noqa: F401  (sets the offline environment variables first)

# Axolotl configures logging when `axolotl.cli` is first imported: colorama wraps sys.stdout and sys.stderr, then
# logging's dictConfig closes every handler that exists. absl's handler (absl comes with rouge-score, which the
# quality tasks import) closes its stream on close unless that stream is the current sys.stderr, and under pytest's
# capture its stream is pytest's own capture file: a test importing `axolotl.cli` after one importing absl closed
# it and every later test on that worker failed. Importing `axolotl.cli` here, before any test module, runs that
# configuration once, before absl exists.
import axolotl.cli  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Paths of the tiny assets (tokenizer, teacher, student, data) built by axolotl_xkd.tiny."""
    from axolotl_xkd.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny"), teacher_steps=200)


@pytest.fixture(scope="session")
def untrained_assets(tmp_path_factory) -> dict[str, Path]:
    """The same folders as `tiny_assets`, with an untrained teacher: enough for config validation, built in seconds."""
    from axolotl_xkd.tiny import arithmetic_rows, build_model, build_tokenizer, write_jsonl

    out = tmp_path_factory.mktemp("untrained")
    tokenizer = build_tokenizer()
    paths = {name: out / name for name in ("tokenizer", "teacher", "student", "data")}
    tokenizer.save_pretrained(paths["tokenizer"])
    rows = arithmetic_rows(80, seed=0)
    write_jsonl(paths["data"] / "train.jsonl", rows[:64])
    write_jsonl(paths["data"] / "eval.jsonl", rows[64:])
    for name, seed in (("teacher", 0), ("student", 1)):
        build_model(tokenizer, hidden=32, layers=2, seed=seed).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast tier needs no trained teacher: a test that uses `tiny_assets` must be marked e2e."""
    unmarked = [item.nodeid for item in items
                if "tiny_assets" in getattr(item, "fixturenames", ()) and item.get_closest_marker("e2e") is None]
    if unmarked:
        raise pytest.UsageError(f"these tests train a teacher (tiny_assets) but are not marked e2e: {unmarked}")
