"""Loading an X-KD student with its reward head for scoring, and the checks that the two belong together.

Imports transformers and project modules below the trainer; never the trainer, the plugin or Axolotl.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from axolotl_xkd.losses.precision import torch_dtype
from axolotl_xkd.options import REWARD_INPUTS
from axolotl_xkd.reward_store import CONFIG_NAME, WEIGHTS_NAME, HeadMetadata, load_reward_head
from axolotl_xkd.scoring.scorer import RewardScorer


def load_scorer(
    student_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    tokenizer: str | os.PathLike | None = None,
) -> RewardScorer:
    """Load the student (plain transformers), its tokenizer and the reward head saved beside it, and check they match.

    `student_dir` is the output_dir of an X-KD run (or one of its checkpoint-N folders); `tokenizer`
    defaults to `student_dir`.
    """
    student_dir = Path(student_dir)
    if not student_dir.is_dir():
        raise FileNotFoundError(f"student directory {student_dir} does not exist")
    if not (student_dir / CONFIG_NAME).is_file() or not (student_dir / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{student_dir} has no X-KD reward head ({CONFIG_NAME} and {WEIGHTS_NAME}). Point --model at the "
            "output_dir (or a checkpoint-N folder) of an `axolotl train` run with the axolotl_xkd plugin and "
            "xkd.reward_kl_weight or xkd.td_weight above 0; a plain SFT or distillation-only student has no reward."
        )
    head, head_config = load_reward_head(student_dir)
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=dtype).to(device)
    tok = AutoTokenizer.from_pretrained(tokenizer or student_dir)
    check_head_matches(head_config, model, tok, where=student_dir)
    return RewardScorer(model, tok, head.to(device), head_config)


def check_head_matches(head_config: dict, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       *, where: str | os.PathLike) -> None:
    """Raise ValueError when the saved head was not trained on this model and tokenizer."""
    config_path = Path(where) / CONFIG_NAME
    if model.get_output_embeddings() is None:
        raise ValueError(f"{where}: the model has no output layer, so its last hidden states cannot be read")
    hidden = model.config.get_text_config().hidden_size
    problems = []
    if head_config["hidden_size"] != hidden:
        problems.append(f"hidden_size {head_config['hidden_size']} but the model's is {hidden}")
    meta = HeadMetadata.of(head_config)
    if meta.vocab_size is not None and meta.vocab_size != len(tokenizer):
        problems.append(f"vocab_size {meta.vocab_size} but the tokenizer has {len(tokenizer)} tokens")
    if meta.eos_token_id is not None and meta.eos_token_id != tokenizer.eos_token_id:
        problems.append(f"eos_token_id {meta.eos_token_id} but the tokenizer's is {tokenizer.eos_token_id}")
    if meta.base_model_type is not None and meta.base_model_type != model.config.model_type:
        problems.append(f"base_model_type {meta.base_model_type!r} but the model is {model.config.model_type!r}")
    if meta.reward_input not in REWARD_INPUTS:
        problems.append(f"unknown reward_input {meta.reward_input!r} (expected one of {REWARD_INPUTS})")
    if problems:
        raise ValueError(
            f"{config_path} does not belong to this model: " + "; ".join(problems) + ". The reward head reads "
            "this student's own hidden states, so it must come from the same X-KD run; copy the model, tokenizer "
            "and xkd_reward_head.* files of one output_dir together."
        )
