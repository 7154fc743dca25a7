"""`axolotl train` with `xkd.teacher.source: server` against `axolotl xkd serve-teacher` (a subprocess on a free
loopback port): with k = |V| its first logged loss equals the in-process teacher's on the same batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import base_config, log_history, merged, serve_teacher, train, with_first_rows, write_config

ROWS = 64


@pytest.fixture(scope="module")
def small_assets(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """The tiny assets with a 64-row training file, to keep the runs short."""
    return with_first_rows(tiny_assets, tmp_path_factory.mktemp("small_data"), ROWS)


@pytest.fixture(scope="module")
def teacher_url(small_assets) -> Iterator[str]:
    with serve_teacher(small_assets["teacher"]) as url:
        yield url


def test_server_teacher_matches_model_teacher(small_assets, teacher_url, tmp_path):
    from transformers import AutoTokenizer

    k = len(AutoTokenizer.from_pretrained(small_assets["tokenizer"]))
    first = {}
    for source in ("model", "server"):
        config = merged(base_config(small_assets, tmp_path / source),
                        {"max_steps": 2, "save_steps": 2, "learning_rate": 1e-6})
        if source == "server":
            config["xkd"]["teacher"] = {"source": "server", "base_url": teacher_url, "top_k": k, "timeout_s": 60,
                                        "max_retries": 1, "prefetch": 2}
        train(write_config(tmp_path / f"{source}.yml", config))
        first[source] = log_history(tmp_path / source / "model")[0]
    model, served = first["model"], first["server"]
    # float32 log-probs sent as JSON decimals round-trip exactly; only the teacher's forward differs
    # (one sequence per request instead of a padded batch), at float32 rounding.
    assert served["xkd/distill"] == pytest.approx(model["xkd/distill"], rel=1e-4, abs=1e-6)
    assert served["loss"] == pytest.approx(model["loss"], rel=1e-4, abs=1e-6)
    assert model["xkd/distill"] > 0.05  # an untrained student is far from the teacher: the check has teeth


def test_on_policy_steps_scored_by_the_server_match_the_model_teacher(small_assets, teacher_url, tmp_path):
    """Greedy on-policy steps: both runs train on the same student answers; the server scores them like the model."""
    from transformers import AutoTokenizer

    k = len(AutoTokenizer.from_pretrained(small_assets["tokenizer"]))
    xkd = {"sequences": "on_policy", "on_policy_fraction": 1.0, "generation": {"max_new_tokens": 6, "temperature": 0}}
    first = {}
    for source in ("model", "server"):
        config = merged(base_config(small_assets, tmp_path / source),
                        {"max_steps": 1, "save_steps": 1, "learning_rate": 1e-6, "xkd": xkd})
        if source == "server":
            config["xkd"]["teacher"] = {"source": "server", "base_url": teacher_url, "top_k": k, "timeout_s": 60,
                                        "max_retries": 1}
        train(write_config(tmp_path / f"{source}.yml", config))
        first[source] = log_history(tmp_path / source / "model")[0]
    model, served = first["model"], first["server"]
    assert served["xkd/on_policy_fraction"] == model["xkd/on_policy_fraction"] == 1.0
    assert served["xkd/gen_length"] == model["xkd/gen_length"]
    assert served["xkd/distill"] == pytest.approx(model["xkd/distill"], rel=1e-4, abs=1e-6)
    assert served["loss"] == pytest.approx(model["loss"], rel=1e-4, abs=1e-6)
