"""`score` finds the training config Axolotl saved with the student, renders every dataset type it accepts as
Axolotl's prompt strategy renders the training row, and refuses the types it cannot render."""

from __future__ import annotations

import json

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

    config = {"base_model": str(untrained_assets["student"]), "datasets": [{"path": "x.jsonl", "type": "pretrain"}],
              "sequence_len": 32, "micro_batch_size": 1, "num_epochs": 1, "learning_rate": 1e-3, "output_dir": "out"}
    tokenizer = AutoTokenizer.from_pretrained(untrained_assets["student"])
    with pytest.raises(ValueError, match="type 'pretrain'.*chat_template and completion. Score plain strings"):
        TrainingFormat.from_yaml(yaml.safe_dump(config), tokenizer, where="cfg.yml")
    with pytest.raises(ValueError, match="dataset index 2 is out of range; its datasets: lists 1"):
        TrainingFormat.from_yaml(yaml.safe_dump(config), tokenizer, where="cfg.yml", dataset_index=2)


# A chat template written with the tiny tokenizer's characters only (it has no <|im_start|>-style tokens).
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% else %}{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
USER_DEFINED = {"field_instruction": "instruction", "field_input": "input", "field_output": "output",
                "format": "{instruction} | {input} =", "no_input_format": "{instruction} ="}
WITH_INPUT = {"instruction": "12+30", "input": "7", "output": "42"}
NO_INPUT = {"instruction": "12+30", "input": "", "output": "42"}
CHAT = {"messages": [{"role": "user", "content": "12+30"}, {"role": "assistant", "content": "42"}]}
# (dataset entry, a training row, the prompt given to score as a string, or None where only the row carries it)
CASES = {
    "alpaca_with_input": ({"type": "alpaca"}, WITH_INPUT, None),
    "alpaca_without_input": ({"type": "alpaca"}, NO_INPUT, "12+30"),
    "alpaca_chatml_style": ({"type": "alpaca:chatml"}, WITH_INPUT, None),
    "alpaca_chat": ({"type": "alpaca_chat"}, WITH_INPUT, None),
    "alpaca_instruct": ({"type": "alpaca_instruct"}, NO_INPUT, "12+30"),
    "alpaca_w_system": ({"type": "alpaca_w_system"}, {**WITH_INPUT, "system": "1+1"}, None),
    "type_dict_with_input": ({"type": USER_DEFINED}, WITH_INPUT, None),
    "type_dict_without_input": ({"type": USER_DEFINED}, {"instruction": "12+30", "output": "42"}, "12+30"),
    "chat_template": ({"type": "chat_template", "field_messages": "messages"}, CHAT, "12+30"),
}


@pytest.fixture()
def form_of(untrained_assets, tmp_path):
    """TrainingFormat of a config with one dataset entry, validated by Axolotl as `axolotl train` validates it."""
    from transformers import AutoTokenizer

    def _form(dataset: dict) -> TrainingFormat:
        config = {"base_model": str(untrained_assets["student"]), "datasets": [{"path": "x.jsonl", **dataset}],
                  "sequence_len": 256, "micro_batch_size": 1, "num_epochs": 1, "learning_rate": 1e-3,
                  "output_dir": str(tmp_path / "out"), "chat_template": "jinja", "chat_template_jinja": TEMPLATE}
        tokenizer = AutoTokenizer.from_pretrained(untrained_assets["student"])
        return TrainingFormat.from_yaml(yaml.safe_dump(config), tokenizer, where="cfg.yml")

    return _form


def training_row(form: TrainingFormat, row: dict) -> dict:
    """`row` tokenized as `axolotl train` tokenizes a row of this dataset: its prompt strategy, through
    get_dataset_wrapper, with the validated config (train_on_inputs off, as in these configs)."""
    from axolotl.utils.data.wrappers import get_dataset_wrapper
    from datasets import Dataset

    kind = form.ds_cfg.type
    base, style = (kind.split(":", 1) + [None])[:2] if isinstance(kind, str) else (None, None)
    (tokenized,), _ = get_dataset_wrapper(form.ds_cfg, form.tokenizer, form.cfg, base, Dataset.from_list([row]), style)
    return tokenized


@pytest.mark.parametrize("case", list(CASES))
def test_pairs_render_as_the_training_row(form_of, case):
    """Issue 35: alpaca rows were scored without their input. Each accepted type renders (a training row as the
    prompt, its answer as the response) into exactly the training row's tokens, split at its first trained label;
    a plain string prompt, where the row holds nothing else, renders the same."""
    dataset, row, text = CASES[case]
    form = form_of(dataset)
    trained = training_row(form, row)
    first = next(i for i, label in enumerate(trained["labels"]) if label != -100)
    want = (trained["input_ids"][:first], trained["input_ids"][first:])
    answer = row["messages"][-1]["content"] if "messages" in row else row["output"]
    prompt_ids, response_ids = form.render([row], [answer])
    assert (prompt_ids[0], response_ids[0]) == want
    assert form.render_prompts([row]) == [want[0]]
    if text is not None:
        assert form.render([text], [answer]) == ([want[0]], [want[1]])


def test_alpaca_rows_keep_their_input_when_the_prompt_field_names_the_instruction(form_of, tmp_path):
    """The reported case: `score --prompt-field instruction --response-field output` on the training file took the
    instruction string and dropped the input; a row with the dataset's fields now renders whole."""
    from axolotl_xkd.cli.score import read_inputs

    form = form_of({"type": "alpaca"})
    data = tmp_path / "alpaca.jsonl"
    data.write_text(json.dumps(WITH_INPUT) + "\n" + json.dumps(NO_INPUT) + "\n")
    prompts, responses = read_inputs(data, "instruction", data, "output", form.dataset_fields())
    assert prompts == [WITH_INPUT, NO_INPUT] and responses == ["42", "42"]
    with_input, without_input = form.render(prompts, responses)[0]
    assert "Input:\n7" in form.tokenizer.decode(with_input) and "Input" not in form.tokenizer.decode(without_input)


def test_completion_splits_after_the_prompts_own_tokens(form_of):
    """completion trains every token (no label marks the prompt's end): the prompt is its own text tokenized as
    training tokenizes a text (BOS, no EOS), the response the rest of the training row of prompt + response."""
    form = form_of({"type": "completion", "field": "body"})
    prompts, responses = ["12+30=", {"body": "2+2=", "id": 3}], ["42", "4"]
    prompt_ids, response_ids = form.render(prompts, responses)
    for prompt, response, p_ids, r_ids in zip(["12+30=", "2+2="], responses, prompt_ids, response_ids):
        assert p_ids + r_ids == training_row(form, {"body": prompt + response})["input_ids"]
        assert p_ids == training_row(form, {"body": prompt})["input_ids"][:-1] and p_ids[0] == form.tokenizer.bos_token_id
        assert r_ids[-1] == form.tokenizer.eos_token_id and form.tokenizer.decode(r_ids[:-1]) == response
    assert form.render_prompts(prompts) == prompt_ids
    assert form.dataset_fields() == ("body",)
