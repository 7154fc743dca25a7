"""On-policy steps (`xkd.sequences: on_policy`): the current student answers the batch's prompts and the
step trains on its answers instead of the dataset's.

The trainer asks `OnPolicySampler` once per optimizer step; the choice is a pure function of (seed, step),
so every rank agrees (under ZeRO-3 generation gathers parameters collectively) and a resumed run makes the
same choices. Imports torch only; the trainer hands in the model, unwrapped for generation.
"""

from __future__ import annotations

import random
import time

from torch import Tensor, nn

from axolotl_xkd.args import GenerationSettings
from axolotl_xkd.sequences import collate_rows, prompts_of, response_rows, sample_responses


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
        self.generation_s = 0.0
        self._since: float | None = None  # the window opens at the first step after a reset

    def is_on_policy(self, step: int) -> bool:
        """Whether optimizer step `step` trains on samples; the same on every rank and after a resume."""
        if self._since is None:
            self._since = time.perf_counter()
        self.steps += 1
        chosen = random.Random(f"xkd-on-policy:{self.seed}:{step}").random() < self.fraction
        self.on_policy_steps += chosen
        return chosen

    def sample(self, model: nn.Module, batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Each batch rebuilt from its prompts and `model`'s responses (one unpacked row per sequence).

        Generation runs in eval mode without gradients; the model's mode is restored afterwards.
        """
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            out = []
            for batch in batches:
                prompts = prompts_of(batch)
                if not prompts:
                    out.append(batch)  # nothing to answer; the dataset's batch trains as it is
                    continue
                responses = sample_responses(model, prompts, self.sampling, pad_id=self.pad_id, eos_id=self.eos_id,
                                             max_length=self.max_length)
                self.sequences += len(responses)
                self.tokens += sum(map(len, responses))
                out.append(collate_rows(response_rows(prompts, responses), pad_id=self.pad_id, like=batch))
        finally:
            model.train(was_training)
        self.generation_s += time.perf_counter() - started
        return out

    def metrics(self) -> dict[str, float]:
        """Share of on-policy steps, generation's share of wall time and (when anything was generated) the mean
        response length, since the last call; then starts a new window."""
        elapsed = max(time.perf_counter() - (self._since or time.perf_counter()), 1e-9)
        logs = {
            "on_policy_fraction": self.on_policy_steps / max(self.steps, 1),
            "gen_time_share": min(self.generation_s / elapsed, 1.0),
        }
        if self.sequences:
            logs["gen_length"] = self.tokens / self.sequences
        self._reset()
        return logs
