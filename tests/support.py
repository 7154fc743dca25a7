"""Shared test support: the tiny assets, Axolotl configs written from a base dict, and `axolotl train`
run for real in a subprocess."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
for _key, _value in ENV.items():
    os.environ.setdefault(_key, _value)


def base_config(assets: dict[str, Path], out: Path) -> dict:
    """A plain Axolotl SFT config on the tiny assets, plus the plugin line and an `xkd:` block."""
    return {
        "base_model": str(assets["student"]),
        "tokenizer_config": str(assets["tokenizer"]),
        "plugins": ["axolotl_xkd.XKDPlugin"],
        "xkd": {"teacher": {"source": "model", "path": str(assets["teacher"])}},
        "datasets": [
            {
                "path": str(assets["data"] / "train.jsonl"),
                "ds_type": "json",
                "type": {
                    "field_instruction": "prompt",
                    "field_output": "response",
                    "format": "{instruction}",
                    "no_input_format": "{instruction}",
                },
            }
        ],
        "train_on_inputs": False,
        "dataset_prepared_path": str(out / "prepared"),
        "val_set_size": 0,
        "sequence_len": 32,
        "sample_packing": False,
        "micro_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "num_epochs": 1,
        "max_steps": 6,
        "optimizer": "adamw_torch",
        "learning_rate": 0.003,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_steps": 3,
        "seed": 42,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "attn_implementation": "sdpa",
        "output_dir": str(out / "model"),
        "save_safetensors": True,
        "report_to": "none",
        "dataloader_num_workers": 0,
    }


def merged(config: dict, overrides: dict) -> dict:
    """`config` with `overrides` merged in, recursively for dicts; a None value removes the key."""
    result = copy.deepcopy(config)
    for key, value in overrides.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def write_config(path: Path, config: dict) -> Path:
    """Write `config` as YAML and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_cli(args: list[str], *, env: dict | None = None, timeout: float = 900, check: bool = True,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a console script of this venv (e.g. ["axolotl", "train", cfg]); output captured as text."""
    full_env = {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=full_env, cwd=cwd or REPO, capture_output=True, text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-8000:]}")
    return proc


def train(config_path: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    """`axolotl train CONFIG` for real."""
    return run_cli(["axolotl", "train", str(config_path), *extra], **kwargs)


def trained(assets: dict[str, Path], folder: Path, overrides: dict) -> Path:
    """`axolotl train` of `base_config(assets, folder)` with `overrides` (config written to folder/config.yml);
    returns the run's output directory."""
    config = merged(base_config(assets, folder), overrides)
    train(write_config(folder / "config.yml", config))
    return Path(config["output_dir"])


def log_history(output_dir: Path) -> list[dict]:
    """The trainer's log entries of the newest checkpoint under `output_dir`."""
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return state["log_history"]


class TeacherServerProcess:
    """A running `axolotl xkd serve-teacher` subprocess: its URL (read from the line it prints once bound), every
    line it has printed so far (a reader thread keeps the pipe drained), and ways to stop it."""

    def __init__(self, model_dir: Path, *extra: str, host: str = "127.0.0.1", port: int = 0,
                 env: dict | None = None, start_timeout: float = 180) -> None:
        full_env = {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.proc = subprocess.Popen(
            [str(BIN / "axolotl"), "xkd", "serve-teacher", "--model", str(model_dir), "--host", host,
             "--port", str(port), *extra],
            env=full_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        fresh: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(fresh,), daemon=True)
        self._reader.start()
        while True:
            try:
                line = fresh.get(timeout=start_timeout)
            except queue.Empty:
                self.kill()
                raise AssertionError(f"serve-teacher printed no URL in {start_timeout}s:\n{self.output}") from None
            if line is None:
                self.proc.wait(timeout=30)
                raise AssertionError(f"serve-teacher exited ({self.proc.returncode}):\n{self.output}")
            if line.startswith("xkd serve-teacher:") and " on http://" in line:
                break
        bound = line.split(" on http://")[1].split()[0]
        self.port = int(bound.rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"  # reached over loopback whatever address it bound

    def _read(self, fresh: queue.Queue) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            fresh.put(line)
        fresh.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> str:
        """SIGTERM (it prints its shutdown line), wait; returns everything it printed."""
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        return self.output

    def kill(self) -> str:
        """SIGKILL, as a crash or a preempted machine would end it; returns everything it printed."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        return self.output


@contextlib.contextmanager
def serve_teacher(model_dir: Path, *extra: str, start_timeout: float = 180) -> Iterator[str]:
    """`axolotl xkd serve-teacher --port 0` in a subprocess on loopback; yields its URL and stops it on exit."""
    server = TeacherServerProcess(model_dir, *extra, start_timeout=start_timeout)
    try:
        yield server.url
    finally:
        server.stop()


def with_first_rows(assets: dict[str, Path], folder: Path, rows: int) -> dict[str, Path]:
    """`assets` with a training file cut to its first `rows` rows (written into `folder`), for short runs."""
    lines = (assets["data"] / "train.jsonl").read_text().splitlines()[:rows]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {**assets, "data": folder}


# The spec's coupled form (XKD_METHOD.md section 2 as written: the TD term on the student's own Q, w_kl = lambda = 1),
# which the loss tests exercise; the loss's defaults are the `xkd:` block's (options.LOSS_DEFAULTS).
SPEC_COUPLED = {"td_target": "observed", "reward_kl_weight": 1.0, "td_weight": 1.0}


def spec_params(**overrides):
    """XKDHyperparams of the spec's coupled form, with `overrides`."""
    from axolotl_xkd.losses import XKDHyperparams

    return XKDHyperparams(**{**SPEC_COUPLED, **overrides})
