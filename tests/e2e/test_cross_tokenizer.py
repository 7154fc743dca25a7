"""End to end: `axolotl train` distils from an in-process teacher of another tokenizer (a sentencepiece-style BPE
built in code, the student keeps the tiny character tokenizer) with `xkd.teacher.cross_tokenizer: true`, unpacked
and with sample packing, and logs what maps and the coverage."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.support import base_config, log_history, merged, run_cli, train, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def other_teacher(untrained_assets, tmp_path_factory) -> Path:
    """A teacher folder whose tokenizer is a sentencepiece-style BPE trained on the task's text."""
    from axolotl_xkd.tiny import build_bpe_tokenizer, build_model

    rows = [json.loads(line) for line in (untrained_assets["data"] / "train.jsonl").read_text().splitlines()]
    tokenizer = build_bpe_tokenizer([r["prompt"] + r["response"] for r in rows], style="sentencepiece",
                                    vocab_size=60)
    folder = tmp_path_factory.mktemp("sp_teacher")
    build_model(tokenizer, hidden=32, layers=2, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_trains_with_a_teacher_of_another_tokenizer(untrained_assets, other_teacher, tmp_path, packing):
    config = merged(base_config(untrained_assets, tmp_path), {
        "max_steps": 3, "save_steps": 3, "sample_packing": packing,
        "xkd": {"teacher": {"path": str(other_teacher), "cross_tokenizer": True, "cross_tokenizer_top_k": 16},
                "td_target": "teacher_logprob"},
    })
    proc = train(write_config(tmp_path / "cfg.yml", config))
    logs = proc.stdout + proc.stderr
    vocab = re.search(r"student vocabulary (\d+) tokens, teacher (\d+); (\d+) teacher tokens map exactly", logs)
    assert vocab and int(vocab[1]) != int(vocab[2]) and 0 < int(vocab[3]) < int(vocab[2]), logs[-3000:]
    coverage = re.search(r"coverage after 1 batches: (\d+) of (\d+) response positions", logs)
    assert coverage and 0 < int(coverage[1]) <= int(coverage[2]), logs[-3000:]
    losses = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
    assert len(losses) == 3
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["xkd/distill"]) for e in losses)
    assert losses[0]["xkd/distill"] > 0  # the teacher's signal reaches the loss


def test_precomputed_store_matches_the_in_process_teacher(untrained_assets, other_teacher, tmp_path):
    """`axolotl xkd precompute --cross-tokenizer` aligns once and stores the records in student positions, with
    both tokenizers' fingerprints and the map's digest; training from it (model_path names the teacher, so the
    pair is checked) gives the in-process cross-tokenizer teacher's loss."""
    cross = {"path": str(other_teacher), "cross_tokenizer": True, "cross_tokenizer_top_k": 16}
    first = {}
    for source in ("model", "precomputed"):
        config = merged(base_config(untrained_assets, tmp_path / source),
                        {"max_steps": 1, "save_steps": 1, "learning_rate": 1e-6, "xkd": {"teacher": cross}})
        if source == "precomputed":
            run_cli(["axolotl", "xkd", "precompute", str(write_config(tmp_path / "pre.yml", config)),
                     "--out", str(tmp_path / "store"), "--top-k", "16", "--batch-size", "16"])
            config["xkd"]["teacher"] = {"source": "precomputed", "path": str(tmp_path / "store"),
                                        "model_path": str(other_teacher)}
        train(write_config(tmp_path / f"{source}.yml", config))
        first[source] = log_history(tmp_path / source / "model")[0]
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["vocab_map"] and manifest["teacher_tokenizer_hash"] != manifest["tokenizer_hash"]
    assert manifest["top_k"] == 17  # the top 16 and the student's own token
    assert first["precomputed"]["xkd/distill"] == pytest.approx(first["model"]["xkd/distill"], rel=2e-3, abs=1e-4)
    assert first["model"]["xkd/distill"] > 0.01
