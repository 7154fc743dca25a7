"""`axolotl xkd score --config`: prompts rendered as training rendered them, checked against the very
rows Axolotl prepared for training, for alpaca-style datasets (a `type:` dict, `type: alpaca`) and a chat_template
dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from axolotl_xkd.scoring import TrainingFormat, load_scorer, saved_training_config
from tests.support import base_config, merged, run_cli, train, write_config

pytestmark = pytest.mark.e2e

ROWS = 24
# A chat template written with the tiny tokenizer's characters only (it has no <|im_start|>-style tokens).
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% else %}{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def prepared_rows(out: Path) -> list[dict]:
    """The tokenized rows (input_ids, labels) `axolotl train` prepared, in data order."""
    (folder,) = [p for p in (out / "prepared").iterdir() if p.is_dir()]
    return list(load_from_disk(str(folder)))


# alpaca (a system line and ### headers around the prompt) is `slow`: the same rule as the other two, 4 more processes.
@pytest.fixture(scope="module", params=["type_dict", pytest.param("alpaca", marks=pytest.mark.slow), "chat_template"])
def trained(request, tiny_assets, tmp_path_factory) -> dict:
    """An X-KD student trained on ROWS arithmetic rows in one dataset format; its config and data."""
    out = tmp_path_factory.mktemp(f"score_{request.param}")
    rows = [json.loads(line) for line in (tiny_assets["data"] / "train.jsonl").read_text().splitlines()[:ROWS]]
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = {"max_steps": 2, "save_steps": 2, "shuffle_merged_datasets": False}
    data = pairs
    if request.param == "chat_template":
        chat = out / "chat.jsonl"
        chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                         {"role": "assistant", "content": r["response"]}]}) + "\n"
                                for r in rows))
        data = chat
        overrides |= {"chat_template": "jinja", "chat_template_jinja": TEMPLATE,
                      "datasets": [{"path": str(chat), "ds_type": "json", "type": "chat_template",
                                    "field_messages": "messages"}]}
    elif request.param == "alpaca":  # Axolotl's alpaca template: a system line and ### headers around the prompt
        alpaca = out / "alpaca.jsonl"
        alpaca.write_text("".join(json.dumps({"instruction": r["prompt"], "input": "", "output": r["response"]}) + "\n"
                                  for r in rows))
        data = alpaca
        overrides |= {"sequence_len": 192, "datasets": [{"path": str(alpaca), "ds_type": "json", "type": "alpaca"}]}
    else:
        overrides["datasets"] = [merged(base_config(tiny_assets, out)["datasets"][0], {"path": str(pairs)})]
    config = merged(base_config(tiny_assets, out), overrides)
    config_path = write_config(out / "cfg.yml", config)
    train(config_path)
    return {"kind": request.param, "out": Path(config["output_dir"]), "config": config_path, "pairs": pairs,
            "data": data, "rows": rows, "prepared": prepared_rows(out)}


def score(trained: dict, tmp_path: Path, *extra: str) -> list[dict]:
    dest = tmp_path / "scores.jsonl"
    run_cli(["axolotl", "xkd", "score", "--model", str(trained["out"]), "--prompts", str(trained["pairs"]),
             "--responses", str(trained["pairs"]), "--per-token", "--out", str(dest), *extra])
    return [json.loads(line) for line in dest.read_text().splitlines()]


def test_config_scores_equal_scores_of_the_rows_axolotl_prepared(trained, tmp_path):
    prepared = trained["prepared"]
    assert len(prepared) == ROWS
    scorer = load_scorer(trained["out"])
    prompt_ids, response_ids = [], []
    for row in prepared:
        first = next(i for i, label in enumerate(row["labels"]) if label != -100)
        prompt_ids.append(row["input_ids"][:first])
        response_ids.append(row["input_ids"][first:])
    expected = scorer.score_ids(prompt_ids, response_ids)
    got = score(trained, tmp_path, "--config", str(trained["config"]))
    assert [r["prompt"] for r in got] == [r["prompt"] for r in trained["rows"]]
    assert [r["token_ids"] for r in got] == response_ids
    assert [r["reward_sum"] for r in got] == pytest.approx([s.reward_sum for s in expected], abs=1e-5)
    assert [r["logprob_sum"] for r in got] == pytest.approx([s.logprob_sum for s in expected], abs=1e-5)
    # Without --config the CLI finds the config `axolotl train` saved in the model folder, and renders the same.
    assert saved_training_config(trained["out"]) is not None
    assert [r["reward_sum"] for r in score(trained, tmp_path)] == pytest.approx([r["reward_sum"] for r in got],
                                                                                abs=1e-6)
    raw = score(trained, tmp_path, "--raw")
    if trained["kind"] != "type_dict":  # the template adds headers around the prompt: plain strings score differently
        assert max(abs(a["logprob_sum"] - b["logprob_sum"]) for a, b in zip(raw, got)) > 1e-3


def test_prompts_for_sampling_are_the_prepared_prompts(trained, tmp_path):
    scorer = load_scorer(trained["out"])
    form = TrainingFormat.from_yaml(trained["config"].read_text(), scorer.tokenizer, where="cfg.yml")
    rendered = form.render_prompts([r["prompt"] for r in trained["rows"]])
    for ids, row in zip(rendered, trained["prepared"]):
        first = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert ids == row["input_ids"][:first]
    # `score --samples` samples from those prompts and reranks.
    dest = tmp_path / "best.jsonl"
    run_cli(["axolotl", "xkd", "score", "--model", str(trained["out"]), "--prompts", str(trained["pairs"]),
             "--samples", "2", "--max-new-tokens", "3", "--config", str(trained["config"]), "--out", str(dest)])
    best = [json.loads(line) for line in dest.read_text().splitlines()]
    assert len(best) == ROWS and all(len(r["samples"]) == 2 for r in best)


def test_dataset_rows_are_prompts_and_the_config_names_the_model(trained, tmp_path):
    """A user scores the training dataset's own rows (alpaca: instruction and input; chat_template: messages, whose
    assistant answer is replaced by the response scored) with `--config` alone: the model is the config's
    output_dir, and each row renders as its plain prompt string does."""
    dest = tmp_path / "rows.jsonl"
    proc = run_cli(["axolotl", "xkd", "score", "--config", str(trained["config"]), "--prompts", str(trained["data"]),
                    "--responses", str(trained["pairs"]), "--per-token", "--out", str(dest)])
    assert "prompts rendered as in training, with" in proc.stderr and "add --raw" in proc.stderr
    got = [json.loads(line) for line in dest.read_text().splitlines()]
    want = score(trained, tmp_path, "--config", str(trained["config"]))
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
    assert [r["reward_sum"] for r in got] == pytest.approx([r["reward_sum"] for r in want], abs=1e-6)
