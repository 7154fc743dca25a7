"""What differs between the Axolotl releases the plugin supports (0.19 on Python 3.11, 0.20/0.21 on 3.12).

Every version-specific decision lives here, so the hooks read the same on every release. Imports only
the standard library and `packaging` at module level; Axolotl is imported lazily.
"""

from __future__ import annotations

import logging
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

LOG = logging.getLogger("axolotl_xkd")

# The releases CI runs the suite on; others may work, and get one warning.
TESTED = ("0.19.0", "0.21.0")
SUPPORTED_RANGE = ">=0.19,<0.22"


def axolotl_version() -> Version:
    """The installed Axolotl release (0.0 when it is not installed, e.g. in a loss-only environment)."""
    try:
        return Version(version("axolotl"))
    except PackageNotFoundError:
        return Version("0")


def merge_hook_available() -> bool:
    """Axolotl 0.21 calls `post_lora_merge` after `axolotl merge-lora`; 0.19 and 0.20 have no such hook."""
    return axolotl_version() >= Version("0.21")


def warn_if_untested() -> None:
    """One warning when the installed Axolotl is outside the range CI tests."""
    found = axolotl_version()
    if found not in SpecifierSet(SUPPORTED_RANGE):
        LOG.warning(
            "axolotl %s is outside the range axolotl_xkd is tested on (%s, CI runs %s); if something breaks, "
            "install one of those releases and report the failure.",
            found, SUPPORTED_RANGE, " and ".join(TESTED),
        )


def copy_reward_head(source: str | Path, target: str | Path) -> list[Path]:
    """Copy the reward head files (weights + JSON) from an adapter folder into a merged-model folder.

    Returns the copied paths; nothing is copied (and [] returned) when `source` holds no head.
    """
    from axolotl_xkd.reward_store import CONFIG_NAME, WEIGHTS_NAME

    source, target = Path(source), Path(target)
    files = [source / name for name in (WEIGHTS_NAME, CONFIG_NAME)]
    if not all(f.is_file() for f in files):
        return []
    target.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, target / f.name)) for f in files]


def merge_instructions(adapter_dir: str | Path) -> str:
    """What a user does with the reward head after `axolotl merge-lora` on a release without the merge hook."""
    from axolotl_xkd.reward_store import CONFIG_NAME, WEIGHTS_NAME

    return (
        f"axolotl {axolotl_version()} has no post_lora_merge hook, so `axolotl merge-lora` will not carry the X-KD "
        f"reward head: after merging, copy {WEIGHTS_NAME} and {CONFIG_NAME} from {adapter_dir} into the merged "
        "folder (or use axolotl >= 0.21, where the plugin copies them)."
    )


def count_trained_tokens(trainer, inputs: dict) -> None:
    """Add a training micro-batch to Axolotl's throughput counters (`tokens/trainable`, `tokens/total`,
    `tokens/train_per_sec_per_gpu`), which Axolotl's own `compute_loss` keeps and a trainer that overrides it must.

    Axolotl 0.21 has a method for it (`_accumulate_token_counts`; its `log` reduces across ranks); 0.19 counts inline
    in `compute_loss`, so this is that code: trainable = labels != -100 (input_ids without labels), summed over
    ranks at every micro-batch, cumulative in `trainer.state.tokens`, which 0.19's `log` reads.
    """
    if hasattr(trainer, "_accumulate_token_counts"):
        trainer._accumulate_token_counts(inputs)
        return
    import torch
    from axolotl.utils.distributed import is_distributed

    tokens = inputs["labels"] if "labels" in inputs else inputs["input_ids"]
    counts = torch.stack([(tokens != -100).sum(), torch.tensor(tokens.numel(), device=tokens.device)])
    if is_distributed():
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
    trainable, total = counts.detach().cpu()
    state = trainer.state
    if not hasattr(state, "tokens"):
        state.tokens = {"trainable": torch.zeros(1), "total": torch.zeros(1)}
    state.tokens["trainable"] = state.tokens["trainable"] + trainable
    state.tokens["total"] = state.tokens["total"] + total
