"""`axolotl train` with teachers and students of the real Llama 3, Qwen3, Gemma 3 and Llama 2 tokenizers (each on a
tiny random Llama body; the tokenizers fetched once into a cache), across tokenizers through each teacher source,
on rows of real text: an in-process Gemma 3 teacher into a Llama 3 student (Alpaca rows), a Llama 2 teacher
precomputed from a `source: precomputed` block into a Qwen3 student (conversations in Qwen3's own chat template),
and a Qwen3 teacher (NFC normalizer) served by `axolotl xkd serve-teacher` into a Gemma 3 student. Each run logs its
vocabularies and its coverage, and trains with finite losses."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from benchmarks.real_tokenizers import TEXTS, load
from tests.support import base_config, log_history, merged, run_cli, serve_teacher, train, write_config

pytestmark = pytest.mark.e2e

PROMPTS = ["Repeat the text exactly.", "Copy this line.", "Say it back:"]


@pytest.fixture(scope="module")
def bodies(tmp_path_factory) -> dict[str, Path]:
    """Family -> a folder with its real tokenizer and a tiny random Llama over its vocabulary."""
    from axolotl_xkd.tiny import build_model

    out = tmp_path_factory.mktemp("real_bodies")
    folders = {}
    for seed, family in enumerate(("llama3", "qwen3", "gemma3", "llama2")):
        tokenizer = load(family)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        folders[family] = out / family
        build_model(tokenizer, hidden=16, layers=1, seed=seed).save_pretrained(folders[family])
        tokenizer.save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Alpaca rows (instruction, input, output) and chat rows (messages) of real text, every kind of TEXTS."""
    out = tmp_path_factory.mktemp("real_data")
    texts = list(TEXTS.values())
    alpaca = [{"instruction": PROMPTS[n % 3], "input": text if n % 2 else "", "output": text}
              for n, text in enumerate(texts * 2)]
    chat = [{"messages": [{"role": "user", "content": f"{PROMPTS[n % 3]}\n{text}"},
                          {"role": "assistant", "content": text}]} for n, text in enumerate(texts * 2)]
    paths = {"alpaca": out / "alpaca.jsonl", "chat": out / "chat.jsonl"}
    for kind, rows in (("alpaca", alpaca), ("chat", chat)):
        paths[kind].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths


def config_for(student: Path, data: dict[str, Path], kind: str, out: Path, teacher: dict) -> dict:
    dataset = ({"path": str(data["alpaca"]), "ds_type": "json", "type": "alpaca"} if kind == "alpaca" else
               {"path": str(data["chat"]), "ds_type": "json", "type": "chat_template", "field_messages": "messages"})
    config = merged(base_config({"student": student, "tokenizer": student, "teacher": student,
                                   "data": data["alpaca"].parent}, out), {
        "sequence_len": 192, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2,
        "save_steps": 2, "learning_rate": 1e-4})
    config["xkd"]["teacher"] = teacher
    config["datasets"] = [dataset]
    if kind == "chat":
        config["chat_template"] = "tokenizer_default"
    return config


def assert_trained(proc, config: dict, student: str, teacher: str) -> None:
    """The run logged both vocabularies and its coverage (most response positions got a teacher distribution) and
    trained with finite losses."""
    logs = proc.stdout + proc.stderr
    sizes = re.search(r"student vocabulary (\d+) tokens, teacher (\d+)", logs)
    assert sizes and (int(sizes[1]), int(sizes[2])) == (len(load(student)), len(load(teacher))), logs[-3000:]
    coverage = re.search(r"coverage after 1 batches: (\d+) of (\d+) response positions", logs)
    assert coverage and int(coverage[2]) > 0 and int(coverage[1]) >= 0.9 * int(coverage[2]), logs[-3000:]
    losses = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(e["loss"]) and e["xkd/distill"] > 0 for e in losses), losses


def test_in_process_gemma3_teacher_into_a_llama3_student(bodies, data, tmp_path):
    teacher = {"source": "model", "path": str(bodies["gemma3"]), "cross_tokenizer": True}
    config = config_for(bodies["llama3"], data, "alpaca", tmp_path, teacher)
    assert_trained(train(write_config(tmp_path / "config.yml", config)), config, "llama3", "gemma3")


def test_precomputed_llama2_teacher_into_a_qwen3_student_on_its_chat_template(bodies, data, tmp_path):
    teacher = {"source": "precomputed", "path": str(tmp_path / "store"), "model_path": str(bodies["llama2"]),
               "cross_tokenizer": True, "cross_tokenizer_top_k": 16}
    config = config_for(bodies["qwen3"], data, "chat", tmp_path, teacher)
    path = write_config(tmp_path / "config.yml", config)
    run_cli(["axolotl", "xkd", "precompute", str(path), "--batch-size", "4"])
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["vocab_map"] and manifest["top_k"] == 17
    proc = train(path)
    logs = proc.stdout + proc.stderr
    assert "cross_tokenizer" not in re.findall(r"Error.*", logs)
    losses = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(e["loss"]) and e["xkd/distill"] > 0 for e in losses), losses


def test_served_qwen3_teacher_into_a_gemma3_student(bodies, data, tmp_path):
    with serve_teacher(bodies["qwen3"], "--num-threads", "1") as url:
        teacher = {"source": "server", "base_url": url, "tokenizer_path": str(bodies["qwen3"]), "top_k": 20,
                   "cross_tokenizer": True, "timeout_s": 300}
        config = config_for(bodies["gemma3"], data, "alpaca", tmp_path, teacher)
        assert_trained(train(write_config(tmp_path / "config.yml", config)), config, "gemma3", "qwen3")


def test_gemma3_and_qwen3_teachers_mixed_by_confidence_into_a_llama3_student(bodies, data, tmp_path):
    """Two teachers of two other real tokenizers at once (`xkd.teachers`, `mixture: confidence`): each projected into
    the Llama 3 student's ids, then mixed over the union of their records; both serve positions, every step."""
    config = config_for(bodies["llama3"], data, "alpaca", tmp_path, {})
    config["xkd"].pop("teacher")
    config["xkd"].update(mixture="confidence", teachers=[
        {"name": "gemma", "source": "model", "path": str(bodies["gemma3"]), "cross_tokenizer": True},
        {"name": "qwen", "source": "model", "path": str(bodies["qwen3"]), "cross_tokenizer": True}])
    proc = train(write_config(tmp_path / "config.yml", config))
    logs = proc.stdout + proc.stderr
    assert "X-KD teacher 'gemma'" in logs and "X-KD teacher 'qwen'" in logs, logs[-3000:]
    losses = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(e["loss"]) and e["xkd/distill"] > 0 for e in losses), losses
    for e in losses:
        gemma, qwen = e["xkd/teacher/gemma/share"], e["xkd/teacher/qwen/share"]
        assert gemma > 0.5 and qwen > 0.5, e  # confidence: both weigh in wherever both have a distribution
