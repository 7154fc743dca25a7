"""Shared test support: the tiny assets, Axolotl configs written from a base dict, and `axolotl train`
run for real in a subprocess."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
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


def log_history(output_dir: Path) -> list[dict]:
    """The trainer's log entries of the newest checkpoint under `output_dir`."""
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return state["log_history"]
