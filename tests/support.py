"""Shared test support: the harness the benchmarks share (benchmarks/harness.py: the tiny-asset configs, `axolotl
train` and the CLI in a subprocess, a teacher server, a CLI run with a fault injected at a store shard), re-exported,
and the test-only helpers (the spec's coupled loss parameters)."""

from __future__ import annotations

from pathlib import Path

# Re-exported for the tests; importing the harness sets the offline environment first.
from benchmarks.harness import (
    BIN,
    ENV,
    HOOKED_CLI,
    ONE_THREAD,
    REPO,
    TeacherServerProcess,
    base_config,
    cli_env,
    free_port,
    kill_when_stopped,
    log_history,
    merged,
    post_status,
    precompute_args,
    run_cli,
    run_disk_full_cli,
    serve_teacher,
    start_stopping_cli,
    train,
    trained,
    with_first_rows,
    write_config,
)

# The spec's coupled form (XKD_METHOD.md section 2 as written: the TD term on the student's own Q, w_kl = lambda = 1),
# which the loss tests exercise; the loss's defaults are the `xkd:` block's (options.LOSS_DEFAULTS).
SPEC_COUPLED = {"td_target": "observed", "reward_kl_weight": 1.0, "td_weight": 1.0}


def teacher_with_extra_token(folder: Path, *, hidden: int) -> Path:
    """A tiny teacher whose tokenizer has one token more than the student's (`<extra>`), saved in `folder`."""
    from axolotl_xkd.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    build_model(tokenizer, hidden=hidden, layers=1, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def spec_params(**overrides):
    """XKDHyperparams of the spec's coupled form, with `overrides`."""
    from axolotl_xkd.losses import XKDHyperparams

    return XKDHyperparams(**{**SPEC_COUPLED, **overrides})
