"""A wrong teacher place fails before any work, naming the key: `axolotl train` before the dataset is prepared (the
reported run got Hugging Face's "Repo id must be in the form ..." after the dataset was prepared and the student
loaded), `axolotl xkd precompute` and `serve-teacher` before they load anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import base_config, merged, run_cli, teacher_with_extra_token, train, write_config

pytestmark = pytest.mark.e2e

# Logged by Axolotl's dataset preparation (axolotl.utils.data), whose first step is this line.
PREPARATION = "Loading raw datasets"


def _train_cases(assets: dict[str, Path], tmp_path: Path) -> dict[str, tuple[dict, str]]:
    empty_store = tmp_path / "empty_store"
    empty_store.mkdir()
    return {
        "teacher_path": ({"path": str(tmp_path / "no_teacher")}, "xkd.teacher.path="),
        "uncached_hub_id": ({"path": "xkd-tests/no-such-teacher"}, "xkd.teacher.path='xkd-tests/no-such-teacher'"),
        "tokenizer_path": ({"tokenizer_path": str(tmp_path / "no_tokenizer")}, "xkd.teacher.tokenizer_path="),
        "store_manifest": ({"source": "precomputed", "path": str(empty_store)}, "has no manifest.json"),
        "server_url": ({"source": "server", "path": None, "base_url": "http://:8000"}, "xkd.teacher.base_url="),
    }


@pytest.mark.parametrize("case", ["teacher_path", "uncached_hub_id", "tokenizer_path", "store_manifest", "server_url"])
def test_train_fails_before_the_dataset_is_prepared(untrained_assets, tmp_path, case):
    teacher, message = _train_cases(untrained_assets, tmp_path)[case]
    config = merged(base_config(untrained_assets, tmp_path), {"xkd": {"teacher": teacher}})
    proc = train(write_config(tmp_path / "config.yml", config), check=False, env={"HF_HUB_OFFLINE": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert message in output, output[-3000:]
    assert "Repo id must be in the form" not in output
    assert PREPARATION not in output and not Path(config["dataset_prepared_path"]).exists(), output[-3000:]


def test_precompute_checks_its_arguments_before_loading_the_config(untrained_assets, tmp_path):
    """--teacher, the config's teacher path and --server are each checked before Axolotl loads (and prints) the
    config; the output folder is not created."""
    config = write_config(tmp_path / "config.yml", base_config(untrained_assets, tmp_path))
    missing = merged(base_config(untrained_assets, tmp_path), {"xkd": {"teacher": {"path": str(tmp_path / "none")}}})
    cases = [
        ([str(config), "--teacher", str(tmp_path / "no_teacher")], "--teacher="),
        ([str(write_config(tmp_path / "missing.yml", missing))], "xkd.teacher.path="),
        ([str(config), "--server", "localhost:8000"], "--server='localhost:8000' must start with http"),
    ]
    for args, message in cases:
        proc = run_cli(["axolotl", "xkd", "precompute", *args, "--out", str(tmp_path / "store")], check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2 and message in output, output[-3000:]  # click's usage error
        assert "config:" not in output and not (tmp_path / "store").exists(), output[-3000:]


def test_serve_teacher_checks_its_model_and_tokenizer(untrained_assets, tmp_path):
    cases = [
        (["--model", str(tmp_path / "no_teacher")], "--model="),
        (["--model", str(untrained_assets["teacher"]), "--tokenizer", str(tmp_path / "no_tok")], "--tokenizer="),
    ]
    for args, message in cases:
        proc = run_cli(["axolotl", "xkd", "serve-teacher", *args, "--port", "0"], check=False, timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2 and message in output, output[-3000:]
        assert "xkd serve-teacher:" not in output, output[-3000:]  # it never bound a port


def test_teacher_of_another_tokenizer_without_the_key_fails_before_the_dataset_is_prepared(untrained_assets, tmp_path):
    """The teacher/student vocabulary check runs in the first hook, on the tokenizers alone: no dataset preparation,
    no student load; the error names the key and the one that allows another tokenizer."""
    other = teacher_with_extra_token(tmp_path / "other_teacher", hidden=16)
    config = merged(base_config(untrained_assets, tmp_path), {"xkd": {"teacher": {"path": str(other)}}})
    proc = train(write_config(tmp_path / "config.yml", config), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert f"xkd.teacher.path={str(other)!r}" in output and "differs from the student's" in output
    assert "cross_tokenizer: true" in output and "'<extra>'" in output
    assert PREPARATION not in output and not Path(config["dataset_prepared_path"]).exists(), output[-3000:]


def test_empty_data_file_fails_naming_it_before_the_dataset_is_prepared(untrained_assets, tmp_path):
    """Issue 35: an empty .jsonl under datasets: ended in a bare StopIteration from the JSON loader."""
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    config = base_config(untrained_assets, tmp_path)
    config["datasets"][0]["path"] = str(empty)
    proc = train(write_config(tmp_path / "config.yml", config), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert f"datasets[0].path={str(empty)!r} is empty: it holds no rows" in output, output[-3000:]
    assert "StopIteration" not in output and PREPARATION not in output, output[-3000:]
