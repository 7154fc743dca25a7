"""End to end: training on sequences that are not the dataset's, through the real `axolotl train`.

- on-policy steps (`xkd.sequences: on_policy`) train on what the student generated: the probe plugin
  records the batches the student's forward received, and they equal the initial student's greedy
  answers to the dataset's prompts, computed here with plain `generate`;
- a run with sampled on-policy steps is reproducible with a fixed seed;
- `axolotl xkd precompute --generate` stores the teacher's answers (resumable, row for row), and
  sequence-level X-KD trains on them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.support import base_config, log_history, merged, run_cli, train, with_first_rows, write_config

pytestmark = pytest.mark.e2e

PLUGINS = ["axolotl_xkd.XKDPlugin", "tests.e2e.probe.ProbePlugin"]
ON_POLICY = {"sequences": "on_policy", "generation": {"max_new_tokens": 6}}
SHORT = {"plugins": PLUGINS, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 3,
         "save_steps": 3}


def probe(output_dir: Path) -> dict:
    return json.loads((output_dir / "probe_rank0.json").read_text())


def split(row: list[int], tokenizer) -> tuple[list[int], list[int]]:
    """(prompt up to '=', response) of one recorded row, padding (-1) removed."""
    tokens = [t for t in row if t != -1]
    cut = tokens.index(tokenizer.convert_tokens_to_ids("=")) + 1
    return tokens[:cut], tokens[cut:]


def gold_answers(data: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    return {r["prompt"]: r["response"] for r in rows}


@pytest.fixture(scope="module")
def assets(tiny_assets, tmp_path_factory):
    return with_first_rows(tiny_assets, tmp_path_factory.mktemp("seq_data"), 64)


def test_on_policy_steps_train_on_the_students_greedy_answers(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    xkd = merged(ON_POLICY, {"on_policy_fraction": 1.0, "generation": {"temperature": 0}})
    config = merged(base_config(assets, tmp_path), {**SHORT, "xkd": xkd})
    train(write_config(tmp_path / "cfg.yml", config))
    out = Path(config["output_dir"])
    logs = [e for e in log_history(out) if "loss" in e]
    assert [e["xkd/on_policy_fraction"] for e in logs] == [1.0, 1.0, 1.0]
    assert all(0 < e["xkd/gen_length"] <= 6 and 0 < e["xkd/rollout_time_share"] < 1 and math.isfinite(e["loss"])
               for e in logs)

    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    student = AutoModelForCausalLM.from_pretrained(assets["student"], attn_implementation="sdpa").eval()
    gold = gold_answers(assets["data"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    differs = 0
    # Both micro-batches of step 1 were sampled from the initial student.
    for batch in probe(out)["first_inputs"][:2]:
        pairs = [split(row, tokenizer) for row in batch]
        width = max(len(p) for p, _ in pairs)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in pairs])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in pairs])
        with torch.no_grad():
            generated = student.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                         pad_token_id=pad, eos_token_id=eos)[:, width:].tolist()
        for (prompt, response), expected in zip(pairs, generated):
            expected = expected[: expected.index(eos) + 1] if eos in expected else expected
            assert response == expected
            prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
            assert prompt_text in gold  # the dataset's prompt ...
            differs += tokenizer.decode(response, skip_special_tokens=True) != gold[prompt_text]
    assert differs > 0  # ... answered by the untrained student, not with the dataset's answer


def test_sampled_on_policy_run_is_reproducible(assets, tmp_path):
    from axolotl_xkd.on_policy import OnPolicySampler
    from axolotl_xkd.args import GenerationSettings

    runs = []
    for name in ("a", "b"):
        config = merged(base_config(assets, tmp_path / name),
                        {**SHORT, "gradient_accumulation_steps": 1, "max_steps": 4, "save_steps": 4,
                         "xkd": merged(ON_POLICY, {"on_policy_fraction": 0.5})})
        train(write_config(tmp_path / name / "cfg.yml", config))
        out = Path(config["output_dir"])
        runs.append(([e for e in log_history(out) if "loss" in e], probe(out)["batches"]))
    (logs_a, batches_a), (logs_b, batches_b) = runs
    assert batches_a == batches_b and len(batches_a) == 4
    assert [e["loss"] for e in logs_a] == [e["loss"] for e in logs_b]
    chooser = OnPolicySampler(GenerationSettings(), fraction=0.5, seed=42, pad_id=0, eos_id=2, max_length=32)
    chosen = [float(chooser.is_on_policy(step)) for step in range(4)]
    assert [e["xkd/on_policy_fraction"] for e in logs_a] == chosen
    assert 0 < sum(chosen) < 4, "seed 42 should mix on-policy and dataset steps in 4 steps"


def test_sequence_kd_on_teacher_generations(assets, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    store = tmp_path / "store"
    xkd = {"sequences": "teacher", "divergence": "sequence", "generation": {"max_new_tokens": 6, "temperature": 0},
           "teacher": {"source": "precomputed", "path": str(store), "model_path": str(assets["teacher"])}}
    config = merged(base_config(assets, tmp_path), {"xkd": xkd, "max_steps": 3, "save_steps": 3})
    cfg = write_config(tmp_path / "cfg.yml", config)
    precompute = ["axolotl", "xkd", "precompute", str(cfg), "--top-k", "8", "--rows-per-shard", "16"]
    assert "sequences: teacher" in run_cli(precompute).stdout
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["sequences"] == "teacher" and manifest["generation"]["temperature"] == 0

    # Resuming after a lost shard regenerates exactly the same rows.
    before = load_from_disk(str(store / "train" / "shard-00001")).to_dict()
    shutil.rmtree(store / "train" / "shard-00001")
    run_cli(precompute)
    assert load_from_disk(str(store / "train" / "shard-00001")).to_dict() == before

    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    gold = gold_answers(assets["data"])
    rows = load_from_disk(str(store / "train" / "shard-00000"))
    teacher_right = 0
    for row in rows:
        prompt, response = split(row["input_ids"], tokenizer)
        labels = row["labels"]
        assert labels == [-100] * len(prompt) + response  # the teacher's answer is the training target
        teacher_right += tokenizer.decode(response, skip_special_tokens=True) == gold[tokenizer.decode(
            prompt, skip_special_tokens=True)]
    # The test teacher (200 training steps) answers a good share right; an untrained model almost none.
    assert teacher_right > len(rows) // 4

    train(cfg)
    logs = [e for e in log_history(Path(config["output_dir"])) if "loss" in e]
    assert len(logs) == 3 and all(math.isfinite(e["loss"]) and e["xkd/distill"] > 0 for e in logs)
    assert logs[-1]["xkd/distill"] < logs[0]["xkd/distill"]
