"""The learned reward applied: score (prompt, response) pairs with an X-KD student's reward head, rerank samples.

XKD_METHOD.md section 4: the reward head saved beside the student is a token-level reward model for
the student's own hidden states, and summed mu_i over a response scores it (best-of-n reranking).

Which tokens count. A pair (prompt, response) is tokenized as it was for training (Axolotl with
`train_on_inputs: false`): prompt with the tokenizer's special tokens (BOS), then the response
without them, then EOS (`append_eos=True`, the default). The response tokens u_P .. u_{L-1} (EOS
included) are the actions a_i = u_{i+1}, i = P-1 .. L-2, that the loss trained on; R_i is read per
the head's `reward_input`: from h_{i+1} (`next_state`, the hidden state at the action's own
position) or from h_i (`state`). h is the student's last hidden state, the input of its output
layer, captured with a forward hook exactly as XKDTrainer does. Prompts rendered as training rendered
them come from `training_format.TrainingFormat`.

Imports torch, transformers and project modules below the trainer; never the trainer, the plugin or Axolotl.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from axolotl_xkd.args import GenerationSettings
from axolotl_xkd.losses.positions import align_reward
from axolotl_xkd.losses.reward_head import VariationalRewardHead
from axolotl_xkd.options import RANK_FIELDS
from axolotl_xkd.reward_store import HeadMetadata
from axolotl_xkd.sequences import pad_token_id, sample_responses

RankBy = Literal["logprob", "sum", "mean"]  # the keys of options.RANK_FIELDS


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
        self.reward_input = HeadMetadata.of(head_config).reward_input
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
