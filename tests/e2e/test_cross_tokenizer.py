"""End to end: `axolotl train` distils from a teacher of another tokenizer (a sentencepiece-style BPE built in code,
the student keeps the tiny character tokenizer) with `xkd.teacher.cross_tokenizer: true`: in process, unpacked and
with sample packing, logging what maps and the coverage; from a precomputed store; and from `axolotl xkd
serve-teacher`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.support import base_config, log_history, merged, run_cli, serve_teacher, train, write_config

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
    """A `source: precomputed` block with `cross_tokenizer: true`: `axolotl xkd precompute` reads the key from the
    config, aligns once and stores the records in student positions, with both tokenizers' fingerprints and the
    map's digest; training from the same config (model_path names the teacher, so the pair is checked) gives the
    in-process cross-tokenizer teacher's loss."""
    cross = {"cross_tokenizer": True, "cross_tokenizer_top_k": 16}
    teachers = {"model": {"path": str(other_teacher), **cross},
                "precomputed": {"source": "precomputed", "path": str(tmp_path / "store"),
                                "model_path": str(other_teacher), **cross}}
    first = {}
    for source, teacher in teachers.items():
        config = merged(base_config(untrained_assets, tmp_path / source),
                        {"max_steps": 1, "save_steps": 1, "learning_rate": 1e-6, "xkd": {"teacher": teacher}})
        path = write_config(tmp_path / f"{source}.yml", config)
        if source == "precomputed":
            run_cli(["axolotl", "xkd", "precompute", str(path), "--batch-size", "16"])
        train(path)
        first[source] = log_history(tmp_path / source / "model")[0]
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["vocab_map"] and manifest["teacher_tokenizer_hash"] != manifest["tokenizer_hash"]
    assert manifest["top_k"] == 17  # the top 16 and the student's own token
    assert first["precomputed"]["xkd/distill"] == pytest.approx(first["model"]["xkd/distill"], rel=2e-3, abs=1e-4)
    assert first["model"]["xkd/distill"] > 0.01


def test_server_teacher_matches_the_in_process_teacher(untrained_assets, other_teacher, tmp_path):
    """`axolotl xkd serve-teacher` serves the teacher of another tokenizer; the run re-tokenizes each sequence, sends
    the teacher's ids and aligns the answers. With every teacher token sent (top_k = |V_T|) its records are the
    in-process teacher's: the same coverage, finite losses, and the first xkd/distill equal up to float32 rounding
    (the two teacher forwards pad their batches differently)."""
    from transformers import AutoTokenizer

    cross = {"cross_tokenizer": True, "cross_tokenizer_top_k": 16}
    teachers = {"model": {"source": "model", "path": str(other_teacher), **cross}}
    first, coverage = {}, {}
    with serve_teacher(other_teacher, "--num-threads", "1") as url:
        teachers["server"] = {"source": "server", "base_url": url, "tokenizer_path": str(other_teacher),
                              "top_k": len(AutoTokenizer.from_pretrained(other_teacher)), "timeout_s": 120, **cross}
        for source, teacher in teachers.items():
            config = merged(base_config(untrained_assets, tmp_path / source),
                            {"max_steps": 2, "save_steps": 2, "learning_rate": 1e-6,
                             "xkd": {"td_target": "teacher_logprob"}})
            config["xkd"]["teacher"] = teacher
            proc = train(write_config(tmp_path / f"{source}.yml", config))
            logs = proc.stdout + proc.stderr
            coverage[source] = re.search(r"coverage after 1 batches: (\d+) of (\d+) response positions", logs)
            assert coverage[source], logs[-3000:]
            losses = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
            assert len(losses) == 2
            assert all(math.isfinite(e["loss"]) and math.isfinite(e["xkd/distill"]) for e in losses)
            first[source] = losses[0]
    assert coverage["server"].groups() == coverage["model"].groups()
    assert 0 < int(coverage["server"][1]) <= int(coverage["server"][2])
    assert first["server"]["xkd/distill"] == pytest.approx(first["model"]["xkd/distill"], rel=1e-4, abs=1e-6)
    assert first["server"]["loss"] == pytest.approx(first["model"]["loss"], rel=1e-4, abs=1e-6)
    assert first["model"]["xkd/distill"] > 0.01  # the teacher's signal reaches the loss: the check has teeth


@pytest.mark.slow
def test_lora_student_under_zero3_on_two_ranks(untrained_assets, other_teacher, tmp_path):
    """The teacher of another tokenizer under DeepSpeed ZeRO-3 on two CPU ranks (each rank re-tokenizes its own
    rows and runs the partitioned teacher's forward) with a LoRA student: the run trains, the coverage is logged,
    the losses are finite and the teacher's signal reaches them, and the adapter and reward head are saved."""
    from tests.e2e.test_distributed import TORCHRUN_ENV, deepspeed_json
    from tests.e2e.test_lora import LORA

    config = merged(merged(base_config(untrained_assets, tmp_path), LORA), {
        "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 2, "save_steps": 2,
        "deepspeed": deepspeed_json(3),
        "xkd": {"teacher": {"path": str(other_teacher), "cross_tokenizer": True, "cross_tokenizer_top_k": 16}},
    })
    proc = run_cli(["torchrun", "--nproc_per_node", "2", "-m", "axolotl.cli.train",
                    str(write_config(tmp_path / "cfg.yml", config))], env=TORCHRUN_ENV)
    logs = proc.stdout + proc.stderr
    assert re.search(r"coverage after 1 batches: (\d+) of (\d+) response positions", logs), logs[-3000:]
    losses = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(e["loss"]) for e in losses)
    assert losses[0]["xkd/distill"] > 0
    out = Path(config["output_dir"])
    assert (out / "adapter_model.safetensors").exists() and (out / "xkd_reward_head.safetensors").exists()
