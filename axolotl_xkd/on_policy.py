"""On-policy steps (`xkd.sequences: on_policy`): the current student answers the batch's prompts and the
step trains on its answers instead of the dataset's.

The trainer asks `OnPolicySampler` once per optimizer step; the choice is a pure function of (seed, step),
so every rank agrees (under ZeRO-3 generation gathers parameters collectively) and a resumed run makes the
same choices; each sample is a pure function of (seed, step, prompt) and the student's weights. Imports torch
only; the trainer hands in the model, unwrapped for generation.
"""

from __future__ import annotations

import random

from torch import Tensor, nn

from axolotl_xkd.args import GenerationSettings
from axolotl_xkd.keys import ROUTE
from axolotl_xkd.sequences import collate_rows, prompt_seed, prompts_of, response_rows, routes_of, sample_responses


class OnPolicySampler:
    """Replaces a step's batches by the student's samples for `fraction` of the steps; keeps the statistics."""

    def __init__(self, sampling: GenerationSettings, *, fraction: float, seed: int, pad_id: int, eos_id: int | None,
                 max_length: int) -> None:
        self.sampling = sampling
        self.fraction = fraction
        self.seed = seed
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.max_length = max_length
        self._reset()

    def _reset(self) -> None:
        self.steps = self.on_policy_steps = self.sequences = self.tokens = 0

    def is_on_policy(self, step: int) -> bool:
        """Whether optimizer step `step` trains on samples; the same on every rank and after a resume."""
        self.steps += 1
        chosen = random.Random(f"xkd-on-policy:{self.seed}:{step}").random() < self.fraction
        self.on_policy_steps += chosen
        return chosen

    def sample(self, model: nn.Module, batches: list[dict[str, Tensor]], step: int) -> list[dict[str, Tensor]]:
        """Each batch of optimizer step `step` rebuilt from its prompts and `model`'s responses (one unpacked row
        per sequence).

        The prompts of the whole step (every micro-batch) are answered together: each distinct prompt once, in
        generate calls of at most `sampling.batch_size` prompts (similar lengths together, so little padding), each
        response sampled from its own seed (`prompt_seed`), so it is the same whatever the other prompts of the step.
        Generation runs in eval mode without gradients; the model's mode is restored afterwards.
        """
        asked = [prompts_of(batch) for batch in batches]
        answers = self._answers(model, {tuple(p) for prompts in asked for p in prompts}, step)
        out = []
        for batch, prompts in zip(batches, asked):
            if not prompts:
                out.append(batch)  # nothing to answer; the dataset's batch trains as it is
                continue
            responses = [answers[tuple(p)] for p in prompts]
            self.sequences += len(responses)
            self.tokens += sum(map(len, responses))
            rows = response_rows(prompts, responses)
            if ROUTE in batch:  # a routed sample keeps its prompt's teacher
                for row, route in zip(rows, routes_of(batch)):
                    row[ROUTE] = [route] * len(row["input_ids"])
            out.append(collate_rows(rows, pad_id=self.pad_id, like=batch))
        return out

    def _answers(self, model: nn.Module, prompts: set[tuple[int, ...]], step: int) -> dict[tuple[int, ...], list[int]]:
        """prompt -> the student's response, in generate calls of at most `sampling.batch_size` prompts."""
        ordered = sorted(prompts, key=lambda p: (len(p), p))
        size = self.sampling.batch_size or max(len(ordered), 1)
        answers = {}
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(ordered), size):
                chunk = [list(p) for p in ordered[start: start + size]]
                seeds = [prompt_seed(self.seed, step, p) for p in chunk]
                responses = sample_responses(model, chunk, self.sampling, pad_id=self.pad_id, eos_id=self.eos_id,
                                             max_length=self.max_length, seeds=seeds)
                answers.update(zip(ordered[start: start + size], responses))
        finally:
            model.train(was_training)
        return answers

    def metrics(self) -> dict[str, float]:
        """Share of on-policy steps and (when anything was generated) the mean response length, since the last call;
        then starts a new window. (The rollout's share of the step time is the trainer's `rollout_time_share`.)"""
        logs = {"on_policy_fraction": self.on_policy_steps / max(self.steps, 1)}
        if self.sequences:
            logs["gen_length"] = self.tokens / self.sequences
        self._reset()
        return logs
