"""Prompts as training saw them: `TrainingFormat` renders (prompt, response) pairs with the training config's own
Axolotl prompt strategy (alpaca-style `type:` dicts, the alpaca types, `chat_template`, `completion`): the very tokens
and labels `axolotl train` builds, split at the first trained label (`completion` trains every token: there, after the
prompt's own tokens). Raw strings match training only when the dataset's prompt format is the bare prompt.

Imports Axolotl inside the methods that need it, so plain scoring works without it; nothing of the trainer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from axolotl_xkd.losses.positions import IGNORE_INDEX

# The alpaca types whose rows are instruction / input / output (alpaca_w_system: and system), by the name before any
# `:style`; their other loaders (e.g. alpaca_chat.load_qa) read other fields and are not rendered.
ALPACA_TYPES = ("alpaca", "alpaca_chat", "alpaca_instruct", "alpaca_w_system")
TYPES = "a `type:` dict (field_instruction/field_input/field_output), " + ", ".join(ALPACA_TYPES) + \
    ", chat_template and completion"


class TrainingFormat:
    """Renders (prompt, response) pairs exactly as `axolotl train` tokenized the config's dataset.

    The pair is written as a row of the dataset's own layout (the instruction/input/output fields of an
    alpaca-style type, a user and an assistant message for `chat_template`, the text field for `completion`), and
    Axolotl's own prompt strategy for that dataset tokenizes it. The prompt is every token before the first trained
    label; the response runs from there to the last trained label (EOS or end-of-turn included where training
    counted it). `train_on_inputs` is turned off for the split; it changes labels, not tokens. `completion` trains
    every token, so there the prompt is the prompt's own tokens and the response the rest.
    """

    def __init__(self, cfg: Any, tokenizer: PreTrainedTokenizerBase, *, dataset_index: int = 0,
                 where: str = "the config") -> None:
        datasets = cfg.datasets or []
        if not 0 <= dataset_index < len(datasets):
            raise ValueError(f"{where}: dataset index {dataset_index} is out of range; its datasets: lists "
                             f"{len(datasets)} (indices from 0)")
        self.cfg = cfg
        self.cfg.train_on_inputs = False
        self.cfg.dataset_num_proc = 1
        self.ds_cfg = datasets[dataset_index]
        self.tokenizer = tokenizer
        if cfg.chat_template and getattr(tokenizer, "chat_template", None) is None:
            # A student saved by `axolotl train` carries the template it trained with; else build it as
            # Axolotl's load_tokenizer does.
            from axolotl.utils.chat_templates import get_chat_template_from_config

            tokenizer.chat_template = get_chat_template_from_config(cfg=cfg, tokenizer=tokenizer)
        kind = self.ds_cfg.type
        self.base = None if isinstance(kind, dict) else str(kind).split(":", 1)[0]
        if not (self.base is None or self.base in (*ALPACA_TYPES, "chat_template", "completion")):
            raise ValueError(f"{where}: datasets[{dataset_index}] has type {kind!r}; scoring renders {TYPES}. Score "
                             "plain strings with --raw instead.")

    @classmethod
    def from_yaml(cls, text: str, tokenizer: PreTrainedTokenizerBase, *, where: str,
                  dataset_index: int = 0) -> TrainingFormat:
        """Validate an Axolotl config (YAML text) with Axolotl's own schema and plugins, as `axolotl train`
        does, without its run setup (which would write a debug.log into the config's output_dir)."""
        import yaml
        from axolotl.cli.config import prepare_plugins
        from axolotl.utils.config import validate_config
        from axolotl.utils.dict import DictDefault

        cfg = DictDefault(yaml.safe_load(text))
        prepare_plugins(cfg)
        return cls(validate_config(cfg), tokenizer, dataset_index=dataset_index, where=where)

    def dataset_fields(self) -> tuple[str, ...]:
        """The fields a row of the dataset's own layout must have to serve as a prompt (the rest of the row, such as
        an alpaca `input` or `system`, renders with it): its messages for chat_template, its text field for
        completion, its instruction field for alpaca-style types."""
        if self.base == "chat_template":
            return (self.ds_cfg.field_messages or "messages",)
        if self.base == "completion":
            return (self.ds_cfg.field or "text",)
        if self.base is None:
            return (self.ds_cfg.type.get("field_instruction") or "instruction",)
        return ("instruction",)

    def _row(self, prompt: str | dict, response: str) -> dict:
        """One row of the dataset's own layout holding the pair. `prompt` is a plain string, or a row of the dataset
        itself (all its fields: an alpaca instruction with its input and system; a completion text, which the
        response continues; messages, where a final assistant message is its answer and is replaced by
        `response`)."""
        kind = self.ds_cfg.type
        if self.base == "completion":
            (text,) = self.dataset_fields()
            return {**prompt, text: prompt[text] + response} if isinstance(prompt, dict) else {text: prompt + response}
        if self.base == "chat_template":
            mapping = dict(self.ds_cfg.message_property_mappings or {})
            role_key, content_key = mapping.get("role", "role"), mapping.get("content", "content")
            roles = self.ds_cfg.roles or {}
            user = (roles.get("user") or ["user"])[0]
            assistant = (roles.get("assistant") or ["assistant"])[0]
            field_messages = self.ds_cfg.field_messages or "messages"
            if isinstance(prompt, dict):
                messages = list(prompt[field_messages])
                if messages and messages[-1].get(role_key) in (roles.get("assistant") or ["assistant"]):
                    messages = messages[:-1]
            else:
                messages = [{role_key: user, content_key: prompt}]
            return {field_messages: [*messages, {role_key: assistant, content_key: response}]}
        if isinstance(kind, dict):
            instruction, output = kind.get("field_instruction") or "instruction", kind.get("field_output") or "output"
            blank = {}
        else:  # the alpaca types read input (and alpaca_w_system: system) as well; a string prompt has neither
            instruction, output = "instruction", "output"
            blank = {"input": "", **({"system": ""} if self.base == "alpaca_w_system" else {})}
        if isinstance(prompt, dict):
            return {**blank, **prompt, output: response}
        return {**blank, instruction: prompt, output: response}

    def render(self, prompts: Sequence[str | dict],
               responses: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, response ids) per pair, as training tokenized them; a prompt is a string or a dataset row."""
        rows = self._tokenized([self._row(p, r) for p, r in zip(prompts, responses, strict=True)])
        if self.base == "completion":
            pairs = [_split_after(prompt, row["input_ids"], n)
                     for n, (prompt, row) in enumerate(zip(self.render_prompts(prompts), rows))]
        else:
            pairs = [_split_at_labels(row["input_ids"], row["labels"], n) for n, row in enumerate(rows)]
        return [p for p, _ in pairs], [r for _, r in pairs]

    def render_prompts(self, prompts: Sequence[str | dict]) -> list[list[int]]:
        """The prompt ids alone (what the student is sampled from): each prompt rendered with a one-letter
        placeholder response (an empty one trains no label, so it marks no boundary), cut before it; for completion,
        the prompt's own text rendered, without the EOS training appends to a text."""
        if self.base != "completion":
            return self.render(prompts, ["A"] * len(prompts))[0]
        eos = self.tokenizer.eos_token_id
        ids = [row["input_ids"] for row in self._tokenized([self._row(p, "") for p in prompts])]
        return [row[:-1] if row and row[-1] == eos else row for row in ids]

    def _tokenized(self, rows: list[dict]) -> list[dict]:
        """`rows` tokenized by the dataset's Axolotl prompt strategy (`get_dataset_wrapper`, as training calls it on
        each dataset); one tokenized row per row, or an error naming the limit that split one."""
        from axolotl.utils.data.wrappers import get_dataset_wrapper
        from datasets import Dataset

        kind = self.ds_cfg.type
        style = kind.split(":", 1)[1] if isinstance(kind, str) and ":" in kind else None
        tokenized, _ = get_dataset_wrapper(self.ds_cfg, self.tokenizer, self.cfg, self.base, Dataset.from_list(rows),
                                           style)
        if len(tokenized) != len(rows):
            raise ValueError(f"{len(rows)} pairs became {len(tokenized)} training rows: a pair is longer than "
                             f"sequence_len ({self.cfg.sequence_len}), which completion training splits into "
                             "several rows; raise sequence_len, shorten the pair, or score it with --raw")
        return list(tokenized)


def _split_at_labels(input_ids: Sequence[int], labels: Sequence[int], row: int) -> tuple[list[int], list[int]]:
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained or trained[0] == 0:
        raise ValueError(f"row {row}: the training format marks no response after a prompt (trained labels at "
                         f"{trained[:5]}...), so the prompt/response boundary is unknown")
    if len(trained) != trained[-1] - trained[0] + 1:
        raise ValueError(f"row {row}: the trained labels are not one contiguous response; score one turn at a time")
    return list(input_ids[: trained[0]]), list(input_ids[trained[0] : trained[-1] + 1])


def _split_after(prompt: Sequence[int], input_ids: Sequence[int], row: int) -> tuple[list[int], list[int]]:
    """(prompt, response) of a completion row: the prompt's own tokens, then the rest of the row."""
    if list(input_ids[: len(prompt)]) != list(prompt):
        raise ValueError(f"row {row}: the prompt's last characters and the response's first tokenize together, so "
                         "the completion text has no token boundary between them; end the prompt with a space or a "
                         "newline, or score with --raw")
    return list(prompt), list(input_ids[len(prompt) :])


def saved_training_config(student_dir: str | os.PathLike) -> tuple[str, str] | None:
    """(YAML text, where) of the config `axolotl train` embedded in the model card (README.md) of an output_dir,
    or of the output_dir above a checkpoint-N folder; None when there is none."""
    student_dir = Path(student_dir)
    folders = [student_dir, student_dir.parent] if student_dir.name.startswith("checkpoint-") else [student_dir]
    for folder in folders:
        card = folder / "README.md"
        if card.is_file():
            found = re.search(r"See axolotl config</summary>.*?```yaml\n(.*?)\n```", card.read_text(encoding="utf-8"),
                              re.DOTALL)
            if found:
                return found.group(1), f"{card} (the config `axolotl train` saved)"
    return None
