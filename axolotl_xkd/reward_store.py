"""Saving and loading the reward head beside a student: safetensors weights plus a JSON config that records the
weights' sha256 and its own (a damaged head is refused on load, not used).

The files sit next to the student's own so the student still loads with plain
`AutoModelForCausalLM.from_pretrained`, and the head can be rebuilt without the trainer.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from axolotl_xkd.distributed import is_partitioned
from axolotl_xkd.integrity import atomic_write, check_sha256, read_sealed_json, seal_json
from axolotl_xkd.losses.reward_head import VariationalRewardHead

WEIGHTS_NAME = "xkd_reward_head.safetensors"
CONFIG_NAME = "xkd_reward_head.json"
FORMAT = "axolotl_xkd.reward_head/1"
ATTRIBUTE = "xkd_reward_head"
WEIGHTS_HASH = "weights_sha256"  # the sha256 of WEIGHTS_NAME, kept in CONFIG_NAME

LOG = logging.getLogger("axolotl_xkd")


@dataclass(frozen=True)
class HeadMetadata:
    """What a saved head records of the run that trained it, beside its shape: written into xkd_reward_head.json
    at training (wiring) and read back to score with it (scoring). None: not recorded (an older head)."""

    axolotl_xkd_version: str | None = None
    reward_input: str = "next_state"  # R_i read from h_{i+1} (next_state) or h_i (state)
    q_form: str | None = None
    temperature: float | None = None
    gamma: float | None = None
    base_model_type: str | None = None  # the student's config.model_type
    vocab_size: int | None = None  # the student tokenizer's length
    eos_token_id: int | None = None

    @classmethod
    def of(cls, config: dict) -> HeadMetadata:
        """The metadata among a head's config entries (its shape and format entries are left out)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def as_dict(self) -> dict:
        return asdict(self)


def save_reward_head(state: dict[str, torch.Tensor], config: dict, directory: str | os.PathLike) -> Path:
    """Write the head's state dict (keys relative to the head) and `head.config()`, plus the weights' sha256 (and the
    JSON's own), each file through a tmp file and a rename; returns the weights path.

    A failed write (a full disk) leaves the files of the last save as they were, or, where the weights were already
    replaced, a JSON whose hash refuses them on load: never a head that loads wrong.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    weights = directory / WEIGHTS_NAME
    blob = save(tensors, metadata={"format": FORMAT})
    try:
        atomic_write(weights, blob)
        atomic_write(directory / CONFIG_NAME, seal_json({"format": FORMAT, **config,
                                                         WEIGHTS_HASH: hashlib.sha256(blob).hexdigest()}))
    except OSError as error:
        raise OSError(error.errno, f"{directory}: saving the X-KD reward head failed ({error.strerror or error}); "
                      f"{CONFIG_NAME} refuses a half-replaced head on load. Free space, then save again (resume "
                      "from the last complete checkpoint-N).") from error
    return weights


def save_beside_student(head: VariationalRewardHead, directory: str | os.PathLike, *,
                        state: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Write a trained head beside its student in `directory`: the one way the trainer (checkpoints, its own final
    save) and the plugin (after Axolotl's final save) write it. `state` is the whole head the trainer gathered
    under ZeRO-3; without it, a rank that holds only shards of the head writes nothing and gets None."""
    if state is None:
        if any(is_partitioned(p) for p in head.parameters()):
            return None
        state = head.state_dict()
    return save_reward_head(state, head.config(), directory)


def load_reward_head(directory: str | os.PathLike) -> tuple[VariationalRewardHead, dict]:
    """Rebuild the head saved in `directory`; returns (head, its config). A damaged file is refused (CorruptFileError,
    naming it); a head saved before hashes existed loads with a warning."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} has no X-KD reward head ({CONFIG_NAME} and {WEIGHTS_NAME}); it is written by "
            "`axolotl train` with the axolotl_xkd plugin when reward_kl_weight or td_weight is above 0."
        )
    advice = (f"do not use it. Copy {CONFIG_NAME} and {WEIGHTS_NAME} again from where the run saved them, or resume "
              "from another checkpoint-N.")
    config, sealed = read_sealed_json(config_path, advice=advice)
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format {config.get('format')!r}, expected {FORMAT!r}")
    recorded = config.pop(WEIGHTS_HASH, None)
    if sealed and recorded is not None:
        check_sha256(weights_path, recorded, where=str(config_path), advice=advice)
    else:
        LOG.warning("%s has no content hashes (saved before heads carried them): damage to the head cannot be "
                    "detected.", config_path)
    meta = {k: v for k, v in config.items() if k not in ("format", "hidden_size", "log_std_min", "log_std_max")}
    head = VariationalRewardHead(
        config["hidden_size"], log_std_min=config["log_std_min"], log_std_max=config["log_std_max"], metadata=meta
    )
    head.load_state_dict(load_file(str(weights_path)))
    return head, config
