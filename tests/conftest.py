"""Session fixtures: the tiny tokenizer, teacher, student and data set, built once in code."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import support  # noqa: F401  (sets the offline environment variables first)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Paths of the tiny assets (tokenizer, teacher, student, data) built by axolotl_xkd.tiny."""
    from axolotl_xkd.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny"), teacher_steps=200)
