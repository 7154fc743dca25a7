"""Prompts as training saw them: `TrainingFormat` renders (prompt, response) pairs with the training config's own
Axolotl prompt strategy (alpaca-style `type:` dicts, `alpaca*` types, `chat_template`): the very tokens and labels
`axolotl train` builds, split at the first trained label. Raw strings match training only when the dataset's prompt
format is the bare prompt.

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


class TrainingFormat:
    """Renders (prompt, response) pairs exactly as `axolotl train` tokenized the config's dataset.

    The pair is written as a row of the dataset's own layout (the instruction/output fields of an
    alpaca-style type, or a user and an assistant message for `chat_template`), and Axolotl's own
    prompt strategy for that dataset tokenizes it. The prompt is every token before the first trained
    label; the response runs from there to the last trained label (EOS or end-of-turn included where
    training counted it). `train_on_inputs` is turned off for the split; it changes labels, not tokens.
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
        if not (isinstance(kind, dict) or kind == "chat_template" or str(kind).split(":")[0].startswith("alpaca")):
            raise ValueError(
                f"{where}: datasets[{dataset_index}] has type {kind!r}; scoring renders alpaca-style types "
                "(a `type:` dict with field_instruction/field_output, or alpaca*) and chat_template"
            )

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
        """The fields a row of the dataset's own layout must have to serve as a prompt: its messages for
        chat_template, its instruction field for alpaca-style types (an `input` field is optional)."""
        kind = self.ds_cfg.type
        if kind == "chat_template":
            return (self.ds_cfg.field_messages or "messages",)
        if isinstance(kind, dict):
            return (kind.get("field_instruction") or "instruction",)
        return ("instruction",)

    def _row(self, prompt: str | dict, response: str) -> dict:
        """One row of the dataset's own layout holding the pair. `prompt` is a plain string, or a row of the dataset
        itself (its instruction and input fields, or its messages: a final assistant message is its answer and is
        replaced by `response`)."""
        kind = self.ds_cfg.type
        if kind == "chat_template":
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
        else:
            instruction, output = "instruction", "output"
        if isinstance(prompt, dict):
            return {**prompt, output: response}
        return {instruction: prompt, output: response} if isinstance(kind, dict) else {
            "instruction": prompt, "input": "", "output": response}

    def render(self, prompts: Sequence[str | dict],
               responses: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, response ids) per pair, as training tokenized them; a prompt is a string or a dataset row."""
        from axolotl.utils.data.wrappers import get_dataset_wrapper
        from datasets import Dataset

        kind = self.ds_cfg.type
        base, style = (kind.split(":", 1) + [None])[:2] if isinstance(kind, str) else (None, None)
        rows = Dataset.from_list([self._row(p, r) for p, r in zip(prompts, responses, strict=True)])
        tokenized, _ = get_dataset_wrapper(self.ds_cfg, self.tokenizer, self.cfg, base, rows, style)
        pairs = [_split_at_labels(row["input_ids"], row["labels"], n) for n, row in enumerate(tokenized)]
        return [p for p, _ in pairs], [r for _, r in pairs]

    def render_prompts(self, prompts: Sequence[str | dict]) -> list[list[int]]:
        """The prompt ids alone (what the student is sampled from): each prompt rendered with a one-letter
        placeholder response (an empty one trains no label, so it marks no boundary), cut before it."""
        return self.render(prompts, ["A"] * len(prompts))[0]


def _split_at_labels(input_ids: Sequence[int], labels: Sequence[int], row: int) -> tuple[list[int], list[int]]:
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained or trained[0] == 0:
        raise ValueError(f"row {row}: the training format marks no response after a prompt (trained labels at "
                         f"{trained[:5]}...), so the prompt/response boundary is unknown")
    if len(trained) != trained[-1] - trained[0] + 1:
        raise ValueError(f"row {row}: the trained labels are not one contiguous response; score one turn at a time")
    return list(input_ids[: trained[0]]), list(input_ids[trained[0] : trained[-1] + 1])


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
