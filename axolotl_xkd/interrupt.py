"""What an interrupted run (Ctrl-C: SIGINT) leaves in its output_dir, and how it says so.

Axolotl's SIGINT handler (on local rank 0) saves the student into output_dir with `save_pretrained`, which leaves the
reward head out, and exits with status 0: the folder looked like a finished run. XKDTrainer watches for the signal
(`SigintSeen`), writes the head beside that student and `MARKER`, logs what was saved and the command that resumes,
and exits with `EXIT_STATUS` instead. The marker is removed when a run into the folder finishes (the plugin's
post_train). Imports the standard library only.
"""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path

MARKER = "XKD_INTERRUPTED.txt"
EXIT_STATUS = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class SigintSeen:
    """Notes whether SIGINT arrived while the `with` block ran, and hands the signal on to the handler installed
    before (Axolotl's save-and-exit, or Python's KeyboardInterrupt), which stays in charge of what happens."""

    def __init__(self) -> None:
        self.seen = False
        self._previous = None

    def __enter__(self) -> SigintSeen:
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                self._previous = previous
                signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum: int, frame) -> None:
        self.seen = True
        self._previous(signum, frame)

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint-N with the largest N in `output_dir`: the one `auto_resume_from_checkpoints` resumes from."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def interrupted_notice(output_dir: str | Path, *, step: int, max_steps: int, saved: list[str],
                       config_path: str | None) -> str:
    """What an interrupt left in `output_dir` (`saved`: what was written there) and the command that resumes."""
    config = shlex.quote(config_path) if config_path else "CONFIG.yml"
    checkpoint = newest_checkpoint(output_dir)
    if checkpoint is None:
        resume = ("No checkpoint-N was saved before the interrupt (save_steps), so there is nothing to resume: start "
                  f"again with `axolotl train {config}`.")
    else:
        done = checkpoint.name.split("-")[-1]
        resume = (f"To continue from {checkpoint}, the newest checkpoint (the steps after {done} are trained again): "
                  f"`axolotl train {config} --resume-from-checkpoint {shlex.quote(str(checkpoint))}` (or set "
                  f"`resume_from_checkpoint: {checkpoint}`, or `auto_resume_from_checkpoints: true`, in the config).")
    return (f"X-KD: training was interrupted (SIGINT) after {step} of {max_steps} optimizer steps. Saved in "
            f"{output_dir}: {'; '.join(saved)}. This is not a finished run: {MARKER} there says so until a run into "
            f"that folder finishes. {resume}")


def mark_interrupted(output_dir: str | Path, notice: str) -> Path:
    """Write `notice` into output_dir/MARKER; returns its path."""
    path = Path(output_dir) / MARKER
    path.write_text(notice + "\n", encoding="utf-8")
    return path


def clear_interrupted(output_dir: str | Path) -> bool:
    """Remove output_dir/MARKER (a run into the folder finished); returns whether there was one."""
    path = Path(output_dir) / MARKER
    existed = path.is_file()
    path.unlink(missing_ok=True)  # every rank may call this on a shared folder
    return existed
