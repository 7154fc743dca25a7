"""`axolotl xkd plot OUTPUT_DIR`: draw the X-KD loss terms and reward statistics of a run over its steps.

Reads the `trainer_state.json` of OUTPUT_DIR and of every checkpoint-*/ in it. Imports matplotlib (an optional
extra) only when drawing, and nothing of the training stack.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

# The train-time metrics XKDTrainer.log writes (trainer.METRICS with the "xkd/" prefix), drawn in two panels.
LOSS_TERMS = ("xkd/distill", "xkd/ce", "xkd/reward_kl", "xkd/td_nll")
REWARD_STATS = ("xkd/reward_mu", "xkd/reward_sigma")
SERIES = LOSS_TERMS + REWARD_STATS
DEFAULT_NAME = "xkd_loss_terms.png"


def trainer_states(output_dir: Path) -> list[Path]:
    """Every trainer_state.json of a run: its checkpoints' in step order, then OUTPUT_DIR's own (written last)."""
    checkpoints = sorted(
        (p for p in output_dir.glob("checkpoint-*/trainer_state.json") if p.parent.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.parent.name.split("-")[-1]),
    )
    top = output_dir / "trainer_state.json"
    return checkpoints + ([top] if top.is_file() else [])


def read_series(states: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) of each name in SERIES found in the states' log histories, merged by step.

    A later state wins where two log the same step (a resumed run rewrites the steps after its checkpoint).
    Names no entry logs are left out.
    """
    merged: dict[str, dict[int, float]] = {name: {} for name in SERIES}
    for state in states:
        for entry in state.get("log_history", []):
            for name in SERIES:
                if name in entry and "step" in entry:
                    merged[name][int(entry["step"])] = float(entry[name])
    return {name: (sorted(points), [points[s] for s in sorted(points)]) for name, points in merged.items() if points}


def draw(series: dict[str, tuple[list[int], list[float]]], out: Path, title: str) -> None:
    """Two panels sharing the step axis: the loss terms, then the reward head's mean and std. Writes a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise click.ClickException(
            "matplotlib is not installed, and `axolotl xkd plot` draws with it: pip install matplotlib "
            "(or install this package with its plot extra: pip install -e '.[plot]')"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (terms, reward) = plt.subplots(2, 1, sharex=True, figsize=(8, 6.5), constrained_layout=True)
    for axis, names, label in ((terms, LOSS_TERMS, "per-token loss term"), (reward, REWARD_STATS, "reward")):
        for name in names:
            if name in series:
                steps, values = series[name]
                axis.plot(steps, values, marker="." if len(steps) < 50 else None, label=name.removeprefix("xkd/"))
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(loc="best", fontsize="small")
    reward.set_xlabel("step")
    reward.xaxis.set_major_locator(MaxNLocator(integer=True))
    terms.set_title(title, fontsize="medium")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)


@click.command("plot")
@click.argument("output_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"PNG to write (default: OUTPUT_DIR/{DEFAULT_NAME}).")
def plot(output_dir: Path, out_file: Path | None) -> None:
    """Draw xkd/distill, ce, reward_kl, td_nll, reward_mu and reward_sigma of the run in OUTPUT_DIR over steps.

    Reads trainer_state.json in OUTPUT_DIR and in each checkpoint-*/ (histories merged by step), so a run
    still training, or one resumed from a checkpoint, plots whole. Needs matplotlib (the `plot` extra).
    """
    paths = trainer_states(output_dir)
    if not paths:
        raise click.ClickException(
            f"{output_dir} has no trainer_state.json, in itself or in a checkpoint-*/ folder; pass the output_dir "
            "of an `axolotl train` run (it is written at each save_steps and at the end)"
        )
    series = read_series([json.loads(p.read_text()) for p in paths])
    if not series:
        raise click.ClickException(
            f"the trainer states of {output_dir} log none of {', '.join(SERIES)}; was the run trained with "
            "`plugins: [axolotl_xkd.XKDPlugin]` and an `xkd:` block, and logging_steps set?"
        )
    out_file = out_file or output_dir / DEFAULT_NAME
    draw(series, out_file, title=f"X-KD loss terms: {output_dir}")
    click.echo(str(out_file))
