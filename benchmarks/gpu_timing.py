"""An Axolotl plugin for benchmarks/gpu_check.py's throughput check: it records the wall time at the end of every
optimizer step (after a CUDA synchronize) and writes the step-to-step intervals to OUTPUT_DIR/step_times.json at the
end of training, with the trainer's closing speed metrics (train_runtime, train_samples_per_second: logged after the
last checkpoint is saved, so no trainer_state.json holds them). Added to both runs of the comparison
(`plugins: [..., benchmarks.gpu_timing.StepTimesPlugin]`, the repository root on sys.path, as `axolotl train` run from
it has), so X-KD and Axolotl's KD plugin are timed alike, whatever each logs: Axolotl's KD trainer replaces
`compute_loss` and so never logs `tokens/train_per_sec_per_gpu`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

FILE = "step_times.json"


class StepTimes(TrainerCallback):
    """Seconds between the ends of consecutive optimizer steps (the first entry: from the start of training)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.last: float | None = None
        self.intervals: list[float] = []
        self.summary: dict = {}

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" in logs:  # the trainer's closing speed metrics, logged after the last checkpoint
            self.summary = {k: v for k, v in logs.items() if isinstance(v, (int, float))}

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / FILE).write_text(json.dumps({"step_seconds": self.intervals, "summary": self.summary}))


class StepTimesPlugin(BasePlugin):
    """Adds `StepTimes` to the trainer."""

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        return [StepTimes(cfg.output_dir)]
