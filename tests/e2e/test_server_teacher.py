"""`axolotl train` with `xkd.teacher.source: server` against `axolotl xkd serve-teacher` (a subprocess on a free
loopback port): with k = |V| its first logged loss equals the in-process teacher's on the same batch; and
`axolotl xkd precompute --server` stores what the in-process precompute stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support import (
    base_config,
    log_history,
    merged,
    run_cli,
    serve_teacher,
    train,
    with_first_rows,
    write_config,
)

pytestmark = pytest.mark.e2e

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


def test_precompute_from_the_server_equals_the_in_process_teacher(small_assets, teacher_url, tmp_path):
    """`axolotl xkd precompute --server URL` stores what the in-process precompute stores (same rows, same
    top-k ids up to ties, log-probs equal after the float16 storage rounding)."""
    from axolotl_xkd.store.format import Manifest, decode
    from axolotl_xkd.store.read import load_split

    config = write_config(tmp_path / "cfg.yml", base_config(small_assets, tmp_path / "prep"))
    common = ["--top-k", "8", "--batch-size", "16", "--rows-per-shard", "32"]
    run_cli(["axolotl", "xkd", "precompute", str(config), "--out", str(tmp_path / "local"), *common])
    run_cli(["axolotl", "xkd", "precompute", str(config), "--out", str(tmp_path / "served"), "--server", teacher_url,
             *common])
    stores = {name: (Manifest.read(tmp_path / name), tmp_path / name) for name in ("local", "served")}
    assert stores["served"][0].teacher.startswith(teacher_url) and stores["served"][0].top_k == 8
    local, served = (load_split(folder, manifest, "train") for manifest, folder in stores.values())
    assert len(local) == len(served) == ROWS
    assert local["input_ids"] == served["input_ids"] and local["labels"] == served["labels"]
    ids_a, lp_a = decode({c: np.concatenate(local[c]) for c in local.column_names if c.startswith("xkd")}, 8)
    ids_b, lp_b = decode({c: np.concatenate(served[c]) for c in served.column_names if c.startswith("xkd")}, 8)
    np.testing.assert_allclose(lp_b, lp_a, rtol=2e-3, atol=2e-3)  # float16 storage of float32 forwards
    assert (ids_a == ids_b).mean() > 0.99  # the same top-k; near-ties may swap neighbours
    assert len(ids_a) > ROWS  # several response positions per row were compared


def test_precompute_refuses_generate_with_a_server(small_assets, teacher_url, tmp_path):
    config = write_config(tmp_path / "cfg.yml", base_config(small_assets, tmp_path / "prep"))
    proc = run_cli(["axolotl", "xkd", "precompute", str(config), "--out", str(tmp_path / "out"), "--server",
                    teacher_url, "--generate"], check=False)
    assert proc.returncode != 0 and "--generate" in proc.stderr + proc.stdout and "--server" in proc.stderr + proc.stdout
