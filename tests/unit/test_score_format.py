"""`score` finds the training config Axolotl saved with the student, and refuses formats it cannot render."""

from __future__ import annotations

import pytest
import yaml

from axolotl_xkd.scoring import TrainingFormat, saved_training_config

CARD = """---
library_name: transformers
---
<details><summary>See axolotl config</summary>

axolotl version: `0.19.0`
```yaml
base_model: some/model
datasets:
- path: data.jsonl
  type: alpaca
```

</details><br>
"""


def test_saved_config_is_read_from_the_model_card(tmp_path):
    (tmp_path / "README.md").write_text(CARD)
    (tmp_path / "checkpoint-4").mkdir()
    for folder in (tmp_path, tmp_path / "checkpoint-4"):  # a checkpoint reads the card of its output_dir
        text, where = saved_training_config(folder)
        assert yaml.safe_load(text)["datasets"][0]["type"] == "alpaca" and str(tmp_path / "README.md") in where


def test_no_saved_config_without_an_axolotl_model_card(tmp_path):
    assert saved_training_config(tmp_path) is None
    (tmp_path / "README.md").write_text("# a project README\n```yaml\na: 1\n```\n")
    assert saved_training_config(tmp_path) is None


def test_unsupported_dataset_type_is_refused(untrained_assets):
    from transformers import AutoTokenizer

    config = {"base_model": str(untrained_assets["student"]), "datasets": [{"path": "x.jsonl", "type": "completion"}],
              "sequence_len": 32, "micro_batch_size": 1, "num_epochs": 1, "learning_rate": 1e-3, "output_dir": "out"}
    tokenizer = AutoTokenizer.from_pretrained(untrained_assets["student"])
    with pytest.raises(ValueError, match="type 'completion'.*chat_template"):
        TrainingFormat.from_yaml(yaml.safe_dump(config), tokenizer, where="cfg.yml")
    with pytest.raises(ValueError, match="dataset index 2 is out of range; its datasets: lists 1"):
        TrainingFormat.from_yaml(yaml.safe_dump(config), tokenizer, where="cfg.yml", dataset_index=2)
