"""Run `axolotl.cli.train` (as `python -m axolotl.cli.train CONFIG` or torchrun's worker would) with one extra
TrainerCallback that stops or kills this process at the end of an optimizer step the test chooses:

    XKD_FAULT_STEP=3 XKD_FAULT_ACTION=stop|kill [XKD_FAULT_RANK=1] python tests/e2e/fault_at_step.py CONFIG.yml

At `on_step_end` of step XKD_FAULT_STEP (its optimizer update done; its log line and any checkpoint of that step
not yet written, since the Trainer logs and saves right after this event) the process on rank XKD_FAULT_RANK
(default 0) sends itself SIGSTOP (the test, its parent, sees that with waitpid(WUNTRACED), then SIGKILLs it or
lets it go on with SIGCONT) or SIGKILL. Without XKD_FAULT_STEP it adds nothing and trains as Axolotl would. The
callback goes into transformers' default callbacks, so the config is the same file the other runs use.
"""

from __future__ import annotations

import os
import signal
import sys

import transformers.trainer
from transformers import TrainerCallback


class FaultAtStep(TrainerCallback):
    def __init__(self, step: int, action: str, rank: int) -> None:
        self.step, self.action, self.rank = step, action, rank

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and int(os.environ.get("RANK", "0")) == self.rank:
            print(f"fault_at_step: {self.action} at the end of step {self.step}, pid {os.getpid()}", flush=True)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSTOP if self.action == "stop" else signal.SIGKILL)


if __name__ == "__main__":
    if "XKD_FAULT_STEP" in os.environ:
        fault = FaultAtStep(int(os.environ["XKD_FAULT_STEP"]), os.environ.get("XKD_FAULT_ACTION", "stop"),
                            int(os.environ.get("XKD_FAULT_RANK", "0")))
        transformers.trainer.DEFAULT_CALLBACKS.append(fault)
    import fire
    from axolotl.cli.train import do_cli

    fire.Fire(do_cli)
