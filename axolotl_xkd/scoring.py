"""The learned reward as a product: load an X-KD student with its reward head, score responses, rerank samples.

XKD_METHOD.md section 4: the reward head saved beside the student is a token-level reward model for
the student's own hidden states, and summed mu_i over a response scores it (best-of-n reranking).

Which tokens count. A pair (prompt, response) is tokenized as it was for training (Axolotl with
`train_on_inputs: false`): prompt with the tokenizer's special tokens (BOS), then the response
without them, then EOS (`append_eos=True`, the default). The response tokens u_P .. u_{L-1} (EOS
included) are the actions a_i = u_{i+1}, i = P-1 .. L-2, that the loss trained on; R_i is read per
the head's `reward_input`: from h_{i+1} (`next_state`, the hidden state at the action's own
position) or from h_i (`state`). h is the student's last hidden state, the input of its output
layer, captured with a forward hook exactly as XKDTrainer does.

Prompts as training saw them. Raw strings are tokenized as above, which matches training only when
the dataset's prompt format is the bare prompt. `TrainingFormat` renders (prompt, response) pairs with
the training config's own Axolotl prompt strategy (alpaca-style `type:` dicts, `alpaca*` types,
`chat_template`): the very tokens and labels `axolotl train` builds, split at the first trained label.

Imports transformers and project modules below the trainer (reward_store, losses); never the
trainer or the plugin. Axolotl is imported only by `TrainingFormat`, so plain scoring works without it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from axolotl_xkd.args import GenerationSettings
from axolotl_xkd.losses.positions import IGNORE_INDEX, align_reward
from axolotl_xkd.losses.reward_head import VariationalRewardHead
from axolotl_xkd.options import REWARD_INPUTS
from axolotl_xkd.reward_store import CONFIG_NAME, WEIGHTS_NAME, load_reward_head
from axolotl_xkd.sequences import pad_token_id, sample_responses

# What best-of-n sorts by: the learned reward summed or averaged over the response, or the student's own
# log-likelihood, which the reranking benchmark (docs/reward.md) found the better pick.
RankBy = Literal["logprob", "sum", "mean"]
RANK_FIELDS: dict[str, str] = {"logprob": "logprob_sum", "sum": "reward_sum", "mean": "reward_mean"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ScoredResponse:
    """One scored (prompt, response) pair; the per-token lists run over the response tokens."""

    prompt: str
    response: str
    reward_sum: float  # sum of mu_i over the response tokens
    reward_mean: float  # reward_sum / num_tokens
    num_tokens: int  # response tokens, EOS included when present
    logprob_sum: float  # the student's log pi(response | prompt), for comparison with the reward
    finished: bool  # the response ends with EOS
    token_ids: list[int] = field(default_factory=list)
    reward_per_token: list[float] = field(default_factory=list)  # mu_i
    reward_std_per_token: list[float] = field(default_factory=list)  # sigma_i

    def to_json(self, *, per_token: bool = False, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
        """A JSON-ready dict; `per_token` adds token ids (and their strings, given `tokenizer`), mu_i and sigma_i."""
        row = {
            "prompt": self.prompt,
            "response": self.response,
            "reward_sum": self.reward_sum,
            "reward_mean": self.reward_mean,
            "num_tokens": self.num_tokens,
            "logprob_sum": self.logprob_sum,
            "finished": self.finished,
        }
        if per_token:
            row["token_ids"] = self.token_ids
            if tokenizer is not None:
                row["tokens"] = tokenizer.convert_ids_to_tokens(self.token_ids)
            row["reward_per_token"] = self.reward_per_token
            row["reward_std_per_token"] = self.reward_std_per_token
        return row


class RewardScorer:
    """A plain transformers student, its tokenizer and its X-KD reward head, in eval mode."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        head: VariationalRewardHead,
        head_config: dict,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.head = head.eval()
        self.head_config = head_config
        self.reward_input = head_config.get("reward_input", "next_state")
        self.vocab_size = len(tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    # ---- scoring -------------------------------------------------------------------------------

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        batch_size: int = 8,
        append_eos: bool = True,
        padding_side: Literal["right", "left"] = "right",
        progress: bool = False,
    ) -> list[ScoredResponse]:
        """Score each (prompt, response) pair with the reward head; one ScoredResponse per pair, in order."""
        if len(prompts) != len(responses):
            raise ValueError(
                f"score: {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt"
            )
        prompt_ids = [self._prompt_ids(p, row) for row, p in enumerate(prompts)]
        eos = [self.tokenizer.eos_token_id] if append_eos else []
        response_ids = []
        for row, response in enumerate(responses):
            ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + eos
            if not ids:
                raise ValueError(f"score: response {row} is empty and append_eos=False, so it has no token to score")
            response_ids.append(ids)
        return self.score_ids(
            prompt_ids, response_ids, prompts=prompts, responses=responses, batch_size=batch_size,
            padding_side=padding_side, progress=progress,
        )

    def score_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        *,
        prompts: Sequence[str] | None = None,
        responses: Sequence[str] | None = None,
        batch_size: int = 8,
        padding_side: Literal["right", "left"] = "right",
        progress: bool = False,
    ) -> list[ScoredResponse]:
        """Score already tokenized pairs (response_ids include EOS where it should count)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        prompts = list(prompts) if prompts is not None else [decode(p) for p in prompt_ids]
        responses = list(responses) if responses is not None else [decode(r) for r in response_ids]
        scored: list[ScoredResponse] = []
        starts = range(0, len(prompt_ids), batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress):
            stop = start + batch_size
            scored.extend(
                self._score_batch(
                    prompt_ids[start:stop], response_ids[start:stop], prompts[start:stop], responses[start:stop],
                    padding_side,
                )
            )
        return scored

    def _prompt_ids(self, prompt: str, row: int) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {row} tokenizes to nothing; the first response token needs a state before it")
        return ids

    @torch.inference_mode()
    def _score_batch(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        prompts: Sequence[str],
        responses: Sequence[str],
        padding_side: str,
    ) -> list[ScoredResponse]:
        rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        hidden, logits, offsets = self._forward(rows, padding_side)
        # The head's outputs at each action position i (a_i = the token at i + 1), read as training reads them.
        mean, log_std = (align_reward(t, self.reward_input) for t in self.head(hidden))
        logprobs = torch.log_softmax(logits[..., : self.vocab_size].float(), dim=-1)
        out = []
        for b, (p_ids, r_ids) in enumerate(zip(prompt_ids, response_ids)):
            # Response token j sits at position pos_j, so it is the action a_i of position i = pos_j - 1.
            actions = torch.arange(len(r_ids), device=hidden.device) + offsets[b] + len(p_ids) - 1
            targets = torch.as_tensor(list(r_ids), device=hidden.device)
            mu = mean[b, actions]
            sigma = log_std[b, actions].exp()
            token_logprobs = logprobs[b, actions].gather(-1, targets[:, None]).squeeze(-1)
            total = float(mu.sum())
            out.append(
                ScoredResponse(
                    prompt=prompts[b],
                    response=responses[b],
                    reward_sum=total,
                    reward_mean=total / len(r_ids),
                    num_tokens=len(r_ids),
                    logprob_sum=float(token_logprobs.sum()),
                    finished=bool(r_ids) and r_ids[-1] == self.tokenizer.eos_token_id,
                    token_ids=list(r_ids),
                    reward_per_token=mu.tolist(),
                    reward_std_per_token=sigma.tolist(),
                )
            )
        return out

    def _forward(self, rows: list[list[int]], padding_side: str) -> tuple[Tensor, Tensor, list[int]]:
        """Padded student forward -> (last hidden states (B, T, H), logits (B, T, V), left offsets per row)."""
        width = max(map(len, rows))
        pad = pad_token_id(self.tokenizer)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        offsets = []
        for b, row in enumerate(rows):
            offset = width - len(row) if padding_side == "left" else 0
            ids[b, offset : offset + len(row)] = torch.as_tensor(row)
            mask[b, offset : offset + len(row)] = 1
            offsets.append(offset)
        # Explicit position ids: left padding must not shift the positions of the real tokens.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        captured: dict[str, Tensor] = {}
        handle = self.model.get_output_embeddings().register_forward_hook(
            lambda _m, args, _o: captured.__setitem__("h", args[0])
        )
        try:
            device = self.device
            outputs = self.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                use_cache=False,
            )
        finally:
            handle.remove()
        return captured["h"], outputs.logits, offsets

    # ---- best-of-n -----------------------------------------------------------------------------

    def rerank(
        self,
        prompts: Sequence[str],
        n: int,
        *,
        rank_by: RankBy = "logprob",
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 8,
        progress: bool = False,
        prompt_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[list[ScoredResponse]]:
        """Sample n responses per prompt and return them scored, best first by `rank_by` (RANK_FIELDS).

        Sampling is seeded by `seed` (the same seed, batch size and device give the same samples).
        A sample that hits max_new_tokens has no EOS (finished=False) and is scored without one.
        `batch_size` counts prompts per generate call; each brings n samples. `prompt_ids` (one per
        prompt, e.g. from `TrainingFormat.render_prompts`) replaces the plain tokenization of `prompts`.
        """
        if n < 1:
            raise ValueError(f"rerank: n must be at least 1, got {n}")
        if rank_by not in RANK_FIELDS:
            raise ValueError(f"rerank: rank_by must be one of {sorted(RANK_FIELDS)}, got {rank_by!r}")
        if seed is not None:
            torch.manual_seed(seed)
        if prompt_ids is None:
            prompt_ids = [self._prompt_ids(p, row) for row, p in enumerate(prompts)]
        elif len(prompt_ids) != len(prompts):
            raise ValueError(f"rerank: {len(prompt_ids)} prompt_ids for {len(prompts)} prompts")
        sampling = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        eos = self.tokenizer.eos_token_id
        pad = pad_token_id(self.tokenizer)
        results: list[list[ScoredResponse]] = []
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="sampling+scoring", unit="batch", disable=not progress):
            batch_prompts = prompt_ids[start : start + batch_size]
            samples = sample_responses(self.model, batch_prompts, sampling, pad_id=pad, eos_id=eos, n=n)
            flat_prompts = [p for p in batch_prompts for _ in range(n)]
            texts = [prompts[start + k // n] for k in range(len(samples))]
            scored = self.score_ids(flat_prompts, samples, prompts=texts, batch_size=len(samples))
            for k in range(len(batch_prompts)):
                group = scored[k * n : (k + 1) * n]
                results.append(sorted(group, key=lambda s: getattr(s, RANK_FIELDS[rank_by]), reverse=True))
        return results


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

    def _row(self, prompt: str, response: str) -> dict:
        kind = self.ds_cfg.type
        if kind == "chat_template":
            mapping = dict(self.ds_cfg.message_property_mappings or {})
            role_key, content_key = mapping.get("role", "role"), mapping.get("content", "content")
            roles = self.ds_cfg.roles or {}
            user = (roles.get("user") or ["user"])[0]
            assistant = (roles.get("assistant") or ["assistant"])[0]
            messages = [{role_key: user, content_key: prompt}, {role_key: assistant, content_key: response}]
            return {self.ds_cfg.field_messages or "messages": messages}
        if isinstance(kind, dict):
            instruction, output = kind.get("field_instruction") or "instruction", kind.get("field_output") or "output"
            return {instruction: prompt, output: response}
        return {"instruction": prompt, "input": "", "output": response}

    def render(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, response ids) per pair, as training tokenized them."""
        from axolotl.utils.data.wrappers import get_dataset_wrapper
        from datasets import Dataset

        kind = self.ds_cfg.type
        base, style = (kind.split(":", 1) + [None])[:2] if isinstance(kind, str) else (None, None)
        rows = Dataset.from_list([self._row(p, r) for p, r in zip(prompts, responses, strict=True)])
        tokenized, _ = get_dataset_wrapper(self.ds_cfg, self.tokenizer, self.cfg, base, rows, style)
        pairs = [_split_at_labels(row["input_ids"], row["labels"], n) for n, row in enumerate(tokenized)]
        return [p for p, _ in pairs], [r for _, r in pairs]

    def render_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
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
    torch_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch_dtype).to(device)
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
    if head_config.get("vocab_size") is not None and head_config["vocab_size"] != len(tokenizer):
        problems.append(f"vocab_size {head_config['vocab_size']} but the tokenizer has {len(tokenizer)} tokens")
    if head_config.get("eos_token_id") is not None and head_config["eos_token_id"] != tokenizer.eos_token_id:
        problems.append(f"eos_token_id {head_config['eos_token_id']} but the tokenizer's is {tokenizer.eos_token_id}")
    model_type = head_config.get("base_model_type")
    if model_type is not None and model_type != model.config.model_type:
        problems.append(f"base_model_type {model_type!r} but the model is {model.config.model_type!r}")
    if head_config.get("reward_input", "next_state") not in REWARD_INPUTS:
        problems.append(f"unknown reward_input {head_config['reward_input']!r} (expected one of {REWARD_INPUTS})")
    if problems:
        raise ValueError(
            f"{config_path} does not belong to this model: " + "; ".join(problems) + ". The reward head reads "
            "this student's own hidden states, so it must come from the same X-KD run; copy the model, tokenizer "
            "and xkd_reward_head.* files of one output_dir together."
        )
