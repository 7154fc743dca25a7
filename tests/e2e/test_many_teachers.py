"""End to end: `axolotl train` with two named teachers (`xkd.teachers`), one of the student's tokenizer and one of
another (a sentencepiece-style BPE built in code), under each `xkd.mixture`: route (rows naming their teacher in a
raw column, packed), weighted and confidence, in process and from `axolotl xkd serve-teacher`; a routed run resumed
from its checkpoint logs what the uninterrupted one does; rows naming no teacher are refused before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support import base_config, log_history, merged, run_cli, serve_teacher, train, write_config

pytestmark = pytest.mark.e2e

CROSS = {"cross_tokenizer": True, "cross_tokenizer_top_k": 16}


@pytest.fixture(scope="module")
def two_teachers(untrained_assets, tmp_path_factory) -> dict[str, Path]:
    """The tiny assets with rows naming a teacher (`teacher`: add or sub, alternating) and a second teacher folder of
    another tokenizer."""
    from axolotl_xkd.tiny import build_bpe_tokenizer, build_model, write_jsonl

    folder = tmp_path_factory.mktemp("two_teachers")
    rows = [json.loads(line) for line in (untrained_assets["data"] / "train.jsonl").read_text().splitlines()]
    write_jsonl(folder / "data" / "train.jsonl", [{**r, "teacher": ("add", "sub")[i % 2]} for i, r in enumerate(rows)])
    tokenizer = build_bpe_tokenizer([r["prompt"] + r["response"] for r in rows], style="sentencepiece", vocab_size=60)
    build_model(tokenizer, hidden=32, layers=2, seed=3).save_pretrained(folder / "sp_teacher")
    tokenizer.save_pretrained(folder / "sp_teacher")
    return {**untrained_assets, "data": folder / "data", "sp_teacher": folder / "sp_teacher"}


def config_for(assets: dict[str, Path], out: Path, teachers: list[dict], **xkd) -> dict:
    config = merged(base_config(assets, out), {"max_steps": 4, "save_steps": 2, "logging_steps": 1,
                                               "xkd": {"teachers": teachers, **xkd}})
    config["xkd"].pop("teacher")
    return config


def in_process(assets: dict[str, Path], **extra) -> list[dict]:
    return [{"name": "add", "source": "model", "path": str(assets["teacher"])},
            {"name": "sub", "source": "model", "path": str(assets["sp_teacher"]), **CROSS, **extra}]


def steps(out: Path) -> list[dict]:
    return [e for e in log_history(out) if "loss" in e]


def test_route_trains_each_row_from_its_teacher_and_resumes_bit_for_bit(two_teachers, tmp_path):
    """Packed rows of both teachers: each teacher serves the positions of its rows (about half each, the shares sum
    to 1) and both start-up lines name their teacher; resumed from checkpoint-2, steps 3-4 log exactly the same."""
    config = config_for(two_teachers, tmp_path, in_process(two_teachers), mixture="route", route_column="teacher")
    config["sample_packing"] = True
    proc = train(write_config(tmp_path / "cfg.yml", config))
    logs = proc.stdout + proc.stderr
    assert "X-KD teacher 'add': source model" in logs and "X-KD teacher 'sub': source model" in logs, logs[-3000:]
    assert "another tokenizer, weight 1" in logs
    run = steps(Path(config["output_dir"]))
    assert len(run) == 4 and all(math.isfinite(e["loss"]) and e["xkd/distill"] > 0 for e in run)
    for entry in run:
        add, sub = entry["xkd/teacher/add/share"], entry["xkd/teacher/sub/share"]
        assert add + sub == pytest.approx(1.0, abs=1e-3) and 0.3 < add < 0.7, entry
        assert entry["xkd/teacher/add/weight"] == pytest.approx(add, abs=1e-6)

    resumed = merged(config, {"output_dir": str(tmp_path / "resumed"),
                              "resume_from_checkpoint": str(Path(config["output_dir"]) / "checkpoint-2")})
    train(write_config(tmp_path / "resumed.yml", resumed))
    again = steps(tmp_path / "resumed")
    keys = ("loss", "xkd/distill", "grad_norm", "xkd/teacher/add/share")
    assert [[e[k] for k in keys] for e in again[-2:]] == [[e[k] for k in keys] for e in run[-2:]]


def test_weighted_mixes_a_served_teacher_and_one_of_another_tokenizer(two_teachers, tmp_path):
    """weighted: a teacher server of the student's tokenizer (weight 1) and an in-process teacher of another (weight
    2); each serves every position it covers, the first with weight 1/3 where both do."""
    with serve_teacher(two_teachers["teacher"]) as url:
        teachers = [{"name": "add", "source": "server", "base_url": url, "top_k": 8},
                    {"name": "sub", "source": "model", "path": str(two_teachers["sp_teacher"]), **CROSS, "weight": 2}]
        config = config_for(two_teachers, tmp_path, teachers, mixture="weighted")
        train(write_config(tmp_path / "cfg.yml", config))
    for entry in steps(Path(config["output_dir"])):
        assert entry["xkd/teacher/add/share"] == 1.0, entry
        assert entry["xkd/teacher/sub/share"] > 0.9, entry
        assert entry["xkd/teacher/add/weight"] + entry["xkd/teacher/sub/weight"] == pytest.approx(1.0, abs=1e-3)
        assert 1 / 3 - 1e-3 < entry["xkd/teacher/add/weight"] < 0.4, entry


def test_confidence_weighs_an_in_process_teacher_and_a_served_one_of_another_tokenizer(two_teachers, tmp_path):
    """confidence: per-position weights from each teacher's log-prob of the observed token, between 0 and 1, summing
    to 1; the served teacher of another tokenizer is aligned here."""
    with serve_teacher(two_teachers["sp_teacher"]) as url:
        teachers = [{"name": "add", "source": "model", "path": str(two_teachers["teacher"])},
                    {"name": "sub", "source": "server", "base_url": url, "top_k": 8, **CROSS,
                     "tokenizer_path": str(two_teachers["sp_teacher"])}]
        config = config_for(two_teachers, tmp_path, teachers, mixture="confidence", confidence_temperature=0.5)
        train(write_config(tmp_path / "cfg.yml", config))
    run = steps(Path(config["output_dir"]))
    assert len(run) == 4 and all(math.isfinite(e["loss"]) for e in run)
    for entry in run:
        add, sub = entry["xkd/teacher/add/weight"], entry["xkd/teacher/sub/weight"]
        assert add + sub == pytest.approx(1.0, abs=1e-3) and 0 < add < 1 and 0 < sub < 1, entry


@pytest.mark.parametrize("edit, message", [
    ("unknown-name", "names no teacher of xkd.teachers ['add', 'sub']; correct the row, or set xkd.default_teacher"),
    ("no-column", "xkd.route_column 'teacher' is not a column of the dataset"),
])
def test_route_refuses_rows_that_name_no_teacher(two_teachers, tmp_path, edit, message):
    data = [json.loads(line) for line in (two_teachers["data"] / "train.jsonl").read_text().splitlines()]
    if edit == "unknown-name":
        data[0]["teacher"] = "mul"
    else:
        for row in data:
            del row["teacher"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in data) + "\n")
    config = config_for({**two_teachers, "data": tmp_path / "data"}, tmp_path, in_process(two_teachers),
                        mixture="route", route_column="teacher")
    proc = run_cli(["python", "-m", "axolotl.cli.train", str(write_config(tmp_path / "cfg.yml", config))],
                   check=False)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in logs, logs[-3000:]
    assert not (Path(config["output_dir"]) / "checkpoint-2").exists()


def test_a_store_among_routed_teachers_gives_the_in_process_teachers_loss(two_teachers, tmp_path):
    """`source: precomputed` among teachers: a store of the whole vocabulary (k = V, float32), written by `axolotl xkd
    precompute` from a one-teacher config, looked up row by row under route (packed), trains as the same teacher run
    in process does (listing every id in the mixture, `mixture_top_k: V`)."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(two_teachers["tokenizer"]))
    store = tmp_path / "store"
    one = merged(base_config(two_teachers, tmp_path / "one"), {"xkd": {"teacher": {
        "source": "precomputed", "path": str(store), "model_path": str(two_teachers["teacher"])}}})
    run_cli(["axolotl", "xkd", "precompute", str(write_config(tmp_path / "one.yml", one)), "--top-k", str(vocab),
             "--logprob-dtype", "float32"])
    losses = {}
    for kind, first in (("store", {"name": "add", "source": "precomputed", "path": str(store)}),
                        ("model", in_process(two_teachers)[0])):
        config = config_for(two_teachers, tmp_path / kind, [first, in_process(two_teachers)[1]], mixture="route",
                            route_column="teacher", mixture_top_k=vocab)  # the in-process teacher lists every id
        config["sample_packing"] = True
        train(write_config(tmp_path / f"{kind}.yml", config))
        losses[kind] = [(e["loss"], e["xkd/teacher/add/share"]) for e in steps(Path(config["output_dir"]))]
    assert len(losses["store"]) == 4
    for (store_loss, store_share), (model_loss, model_share) in zip(losses["store"], losses["model"]):
        assert store_share == model_share
        assert store_loss == pytest.approx(model_loss, rel=1e-4)


def test_route_under_zero3_runs_each_sharded_teacher_on_every_rank(two_teachers, tmp_path):
    """Two ranks under ZeRO-3, one row per micro-batch, rows alternating teachers: each rank's batch names one teacher,
    yet both sharded teachers (one of another tokenizer) run a forward on every rank, since their parameters are
    gathered collectively; without that the ranks would wait on each other forever (the run's timeout)."""
    from tests.e2e.test_distributed import deepspeed_json, torchrun

    config = config_for(two_teachers, tmp_path, in_process(two_teachers), mixture="route", route_column="teacher")
    config.update({"deepspeed": deepspeed_json(3), "micro_batch_size": 1, "gradient_accumulation_steps": 1,
                   "max_steps": 3, "save_steps": 3})
    proc = torchrun(write_config(tmp_path / "cfg.yml", config))
    assert "ZeRO-3 sharded" in proc.stdout + proc.stderr
    run = steps(Path(config["output_dir"]))
    assert len(run) == 3 and all(math.isfinite(e["loss"]) for e in run)
    assert all(e["xkd/teacher/add/share"] in (0.0, 1.0) for e in run)  # rank 0's single row: one teacher's


def test_precompute_writes_one_store_per_named_teacher_and_a_swapped_store_is_refused(two_teachers, tmp_path):
    """`axolotl xkd precompute` on a config with two `source: precomputed` teachers (one of another tokenizer) writes
    each one's store with its name; confidence trains from both; a store of the other name is refused at start."""
    stores = [{"name": "add", "source": "precomputed", "path": str(tmp_path / "add"),
               "model_path": str(two_teachers["teacher"])},
              {"name": "sub", "source": "precomputed", "path": str(tmp_path / "sub"),
               "model_path": str(two_teachers["sp_teacher"]), **CROSS}]
    config = config_for(two_teachers, tmp_path, stores, mixture="confidence")
    path = write_config(tmp_path / "cfg.yml", config)
    run_cli(["axolotl", "xkd", "precompute", str(path), "--top-k", "8"])
    from axolotl_xkd.store.format import Manifest

    assert [Manifest.read(tmp_path / n).teacher_name for n in ("add", "sub")] == ["add", "sub"]
    assert Manifest.read(tmp_path / "sub").vocab_map is not None  # aligned to the student's positions
    train(path)
    run = steps(Path(config["output_dir"]))
    assert len(run) == 4 and all(e["xkd/teacher/add/share"] == 1.0 and e["xkd/teacher/sub/share"] > 0.9 for e in run)

    swapped = merged(config, {"output_dir": str(tmp_path / "swapped"),
                              "dataset_prepared_path": str(tmp_path / "swapped_prepared")})
    swapped["xkd"]["teachers"] = [{**stores[0], "path": str(tmp_path / "sub")}, stores[1]]
    proc = run_cli(["python", "-m", "axolotl.cli.train", str(write_config(tmp_path / "swapped.yml", swapped))],
                   check=False)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0, logs[-3000:]
    assert "the store was recorded for the teacher 'sub', but xkd.teachers[0] is named 'add'" in logs, logs[-3000:]
    assert not (tmp_path / "swapped_prepared").exists()  # refused before the dataset is prepared


def test_route_with_every_row_naming_one_teacher_trains_as_that_teacher_alone(two_teachers, tmp_path):
    """Every row routed to `add`: the routed student trains as the one-teacher student of `add` does (same losses to
    float rounding: the one-teacher run forms the teacher's logits in the chunked loss, the mixture hands them over)."""
    data = [json.loads(line) for line in (two_teachers["data"] / "train.jsonl").read_text().splitlines()]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps({**r, "teacher": "add"}) for r in data) + "\n")
    assets = {**two_teachers, "data": tmp_path / "data"}
    routed = config_for(assets, tmp_path / "routed", in_process(two_teachers), mixture="route", route_column="teacher")
    train(write_config(tmp_path / "routed.yml", routed))
    alone = merged(base_config(assets, tmp_path / "alone"), {"max_steps": 4, "save_steps": 2, "logging_steps": 1})
    train(write_config(tmp_path / "alone.yml", alone))
    routed_run, alone_run = steps(Path(routed["output_dir"])), steps(Path(alone["output_dir"]))
    assert [e["xkd/teacher/add/share"] for e in routed_run] == [1.0] * 4
    for a, b in zip(routed_run, alone_run, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
