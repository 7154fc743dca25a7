"""Training from `axolotl xkd precompute` output with k = |V| reproduces the in-process teacher's loss,
for unpacked and packed (sample_packing, V2 multipack collator) batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import base_config, log_history, merged, run_cli, train, with_first_rows, write_config

pytestmark = pytest.mark.e2e

ROWS = 128


@pytest.fixture(scope="module")
def small_assets(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """The tiny assets with a 128-row training file, to keep the runs short."""
    return with_first_rows(tiny_assets, tmp_path_factory.mktemp("small_data"), ROWS)


def one_step(config: dict) -> dict:
    return merged(config, {"max_steps": 1, "save_steps": 1, "learning_rate": 1e-6})


@pytest.fixture(scope="module")
def store(small_assets, tmp_path_factory) -> tuple[Path, int]:
    """A k = |V| store of the small data, made from the same config the model-teacher run uses."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("store")
    config = one_step(base_config(small_assets, out / "prep"))
    cfg_path = write_config(out / "precompute.yml", config)
    k = len(AutoTokenizer.from_pretrained(small_assets["tokenizer"]))
    run_cli(["axolotl", "xkd", "precompute", str(cfg_path), "--out", str(out / "topk"), "--top-k", str(k),
             "--batch-size", "16", "--rows-per-shard", "64"])
    return out / "topk", k


# Unpacked is `slow`: the packed case covers the same store reads plus the segment boundaries.
@pytest.mark.parametrize("packing", [pytest.param(False, marks=pytest.mark.slow), True], ids=["unpacked", "packed"])
def test_full_vocab_store_matches_model_teacher(small_assets, store, tmp_path, packing):
    topk_dir, k = store
    manifest = json.loads((topk_dir / "manifest.json").read_text())
    assert manifest["top_k"] == k and manifest["alignment"].startswith("student:")
    first = {}
    for source in ("model", "precomputed"):
        config = one_step(base_config(small_assets, tmp_path / source))
        config["sample_packing"] = packing
        if source == "precomputed":
            config["xkd"]["teacher"] = {"source": "precomputed", "path": str(topk_dir), "top_k": k}
        train(write_config(tmp_path / f"{source}.yml", config))
        first[source] = log_history(tmp_path / source / "model")[0]
    model, stored = first["model"], first["precomputed"]
    # float16 log-probs: relative error about 2^-11 per entry, so the distillation term agrees to ~1e-3.
    assert stored["xkd/distill"] == pytest.approx(model["xkd/distill"], rel=2e-3, abs=1e-4)
    assert stored["loss"] == pytest.approx(model["loss"], rel=2e-3, abs=2e-3)
    # The teacher-free terms see the same student on the same batch (float summation order aside).
    for name in ("xkd/td_nll", "xkd/reward_kl"):
        assert stored[name] == pytest.approx(model[name], rel=2e-4, abs=1e-6), name
    assert model["xkd/distill"] > 0.05  # an untrained student is far from the teacher: the check has teeth
