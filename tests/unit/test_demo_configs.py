"""scripts/demo.py's configs: the SFT arm on the teacher's answers is the plain SFT config (no plugin, no `xkd:`
block) on the answers the X-KD arm trains on, with the same student, steps, batch and seed (docs/demo.md)."""

from __future__ import annotations

import yaml

from scripts.demo import ANSWERS, EXAMPLE, MODELS, demo_configs

IDENTICAL = ("base_model", "tokenizer_config", "max_steps", "micro_batch_size", "gradient_accumulation_steps",
             "learning_rate", "optimizer", "lr_scheduler", "seed", "sequence_len", "save_steps", "logging_steps")


def test_sft_on_the_teacher_answers_is_the_plain_sft_config_on_the_stored_answers():
    configs = demo_configs(yaml.safe_load(EXAMPLE.read_text()), "runs/x", seed=7, steps=12)
    sft, sft_teacher, xkd_teacher = configs["sft"], configs["sft_teacher"], configs["xkd_teacher"]
    assert "xkd" not in sft_teacher and "plugins" not in sft_teacher
    assert {k: v for k, v in sft_teacher.items() if k not in ("datasets", "output_dir", "dataset_prepared_path")} == {
        k: v for k, v in sft.items() if k not in ("datasets", "output_dir", "dataset_prepared_path")}
    for key in IDENTICAL:
        assert sft_teacher[key] == xkd_teacher[key], key
    assert sft_teacher["max_steps"] == 12 and sft_teacher["seed"] == 7
    (dataset,) = sft_teacher["datasets"]
    assert dataset["path"] == f"runs/x/data/{ANSWERS}"
    assert {k: v for k, v in dataset.items() if k != "path"} == {
        k: v for k, v in xkd_teacher["datasets"][0].items() if k != "path"}
    # The answers come from the X-KD arm's store, greedy.
    assert xkd_teacher["xkd"]["teacher"]["path"] == "runs/x/teacher_answers"
    assert xkd_teacher["xkd"]["generation"]["temperature"] == 0.0
    folders = {stem: config["output_dir"] for stem, config in configs.items()}
    assert len(set(folders.values())) == 4
    assert {f"runs/x/{folder}" for _, folder, _ in MODELS} >= set(folders.values())
