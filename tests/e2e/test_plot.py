"""`axolotl xkd plot`: the series it reads from a run's trainer states, and the PNG it draws from a real
`axolotl train` X-KD run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from axolotl_xkd.cli.plot import DEFAULT_NAME, SERIES, plot, read_series, trainer_states
from tests.support import log_history, run_cli, trained

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(untrained_assets, tmp_path_factory) -> Path:
    """Output folder of a 4-step X-KD run with checkpoints at steps 2 and 4."""
    return trained(untrained_assets, tmp_path_factory.mktemp("xkd_plot"), {"max_steps": 4, "save_steps": 2})


def test_series_names_are_the_trainers_metrics():
    from axolotl_xkd.trainer import METRICS

    assert SERIES == tuple(f"xkd/{name}" for name in METRICS)


def test_read_series_merges_checkpoints_by_step():
    """A resumed run: the later state rewrote step 2 and added step 3; eval entries and other keys are ignored."""
    first = {"log_history": [{"step": 1, "xkd/distill": 3.0, "loss": 9.0}, {"step": 2, "xkd/distill": 2.5}]}
    later = {"log_history": [{"step": 2, "xkd/distill": 2.0, "xkd/td_nll": 1.0},
                             {"step": 3, "xkd/distill": 1.5, "xkd/td_nll": 0.5},
                             {"step": 3, "eval_xkd/distill": 7.0}]}
    series = read_series([first, later])
    assert series == {"xkd/distill": ([1, 2, 3], [3.0, 2.0, 1.5]), "xkd/td_nll": ([2, 3], [1.0, 0.5])}


def test_trainer_states_order_checkpoints_by_number(tmp_path):
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-x", "."):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "trainer_state.json").write_text("{}")
    assert trainer_states(tmp_path) == [tmp_path / "checkpoint-9" / "trainer_state.json",
                                        tmp_path / "checkpoint-10" / "trainer_state.json",
                                        tmp_path / "trainer_state.json"]


def test_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "xkd/distill": 1.0}]}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is not installed
    result = CliRunner().invoke(plot, [str(tmp_path)])
    assert result.exit_code == 1
    assert "pip install matplotlib" in result.output and "[plot]" in result.output
    assert not (tmp_path / DEFAULT_NAME).exists()


def test_plot_refuses_a_folder_without_trainer_state(tmp_path):
    result = CliRunner().invoke(plot, [str(tmp_path)])
    assert result.exit_code == 1 and "no trainer_state.json" in result.output


@pytest.mark.e2e
def test_series_come_from_the_runs_trainer_state(run_dir):
    """Every plotted point is a logged value of the run, at its step, across both checkpoints."""
    history = log_history(run_dir)
    series = read_series([json.loads(p.read_text()) for p in trainer_states(run_dir)])
    assert set(series) == set(SERIES)
    for name, (steps, values) in series.items():
        logged = [(entry["step"], entry[name]) for entry in history if name in entry]
        assert list(zip(steps, values)) == logged
        assert steps == [1, 2, 3, 4]


@pytest.mark.e2e
def test_plot_cli_writes_a_png(run_dir, tmp_path):
    from matplotlib.image import imread

    proc = run_cli(["axolotl", "xkd", "plot", str(run_dir)])
    default = run_dir / DEFAULT_NAME
    assert proc.stdout.strip().splitlines()[-1] == str(default)
    assert default.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(default).shape[:2]
    assert width > 400 and height > 400

    chosen = tmp_path / "plots" / "run.png"
    proc = run_cli(["axolotl", "xkd", "plot", str(run_dir), "--out", str(chosen)])
    assert proc.stdout.strip().splitlines()[-1] == str(chosen)
    assert chosen.read_bytes()[:8] == PNG_MAGIC
