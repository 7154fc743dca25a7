"""End to end: `xkd.sequences: teacher` with several teachers (`xkd.teachers`), `axolotl xkd precompute` then the real
`axolotl train`: under route each store holds its routed rows answered by its own teacher, and training routes each
row to the store it came from; under a mixture the named `xkd.generator` answers every row once, every store (one
of another tokenizer) records those rows and a live teacher scores them; the configs that cannot say who answers
are refused before the dataset is prepared."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.support import base_config, log_history, merged, run_cli, train, write_config

pytestmark = pytest.mark.e2e

GENERATION = {"max_new_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def assets(untrained_assets, tmp_path_factory) -> dict[str, Path]:
    """The tiny assets with rows naming a teacher (`teacher`: add or sub, alternating), a second teacher of the
    student's tokenizer (other weights, so its answers differ) and one of another tokenizer."""
    from axolotl_xkd.tiny import build_bpe_tokenizer, build_model, build_tokenizer, write_jsonl

    folder = tmp_path_factory.mktemp("generated")
    rows = [json.loads(line) for line in (untrained_assets["data"] / "train.jsonl").read_text().splitlines()]
    write_jsonl(folder / "data" / "train.jsonl", [{**r, "teacher": ("add", "sub")[i % 2]} for i, r in enumerate(rows)])
    build_model(build_tokenizer(), hidden=32, layers=2, seed=5).save_pretrained(folder / "teacher2")
    build_tokenizer().save_pretrained(folder / "teacher2")
    sp = build_bpe_tokenizer([r["prompt"] + r["response"] for r in rows], style="sentencepiece", vocab_size=60)
    build_model(sp, hidden=32, layers=2, seed=3).save_pretrained(folder / "sp_teacher")
    sp.save_pretrained(folder / "sp_teacher")
    return {**untrained_assets, "data": folder / "data", "teacher2": folder / "teacher2",
            "sp_teacher": folder / "sp_teacher"}


def config_for(assets: dict[str, Path], out: Path, teachers: list[dict], **xkd) -> dict:
    config = merged(base_config(assets, out), {"max_steps": 4, "save_steps": 4, "logging_steps": 1, "xkd": {
        "teachers": teachers, "sequences": "teacher", "generation": GENERATION, **xkd}})
    config["xkd"].pop("teacher")
    return config


def store(name: str, folder: Path, model: Path, **extra) -> dict:
    return {"name": name, "source": "precomputed", "path": str(folder / name), "model_path": str(model), **extra}


def stored(folder: Path) -> tuple[dict, list[dict]]:
    """A store's manifest and its train rows (input_ids, labels)."""
    from axolotl_xkd.store.format import Manifest
    from axolotl_xkd.store.read import load_split

    manifest = Manifest.read(folder)
    rows = load_split(folder, manifest, "train").select_columns(["input_ids", "labels"])
    return json.loads((folder / "manifest.json").read_text()), rows.to_list()


def answers(model_dir: Path, rows: list[dict]) -> list[list[int]]:
    """The greedy answers of the model at `model_dir` to the rows' prompts, asked in the precompute's batches of 8."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_xkd.args import GenerationSettings
    from axolotl_xkd.sequences import pad_token_id, prompt_of, sample_responses

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [prompt_of(r["input_ids"], r["labels"]) for r in rows]
    out = []
    for b in range(0, len(prompts), 8):
        out += sample_responses(model, prompts[b: b + 8], GenerationSettings(**GENERATION),
                                pad_id=pad_token_id(tokenizer), eos_id=tokenizer.eos_token_id, max_length=32)
    return out


def responses(rows: list[dict]) -> list[list[int]]:
    return [[t for t, label in zip(r["input_ids"], r["labels"]) if label != -100] for r in rows]


def steps(out: Path) -> list[dict]:
    return [e for e in log_history(out) if "loss" in e]


def test_route_generates_each_row_with_its_routed_teacher_and_trains_on_the_union(assets, tmp_path):
    """Each store holds the rows whose `teacher` names it, answered by that teacher (its greedy answers, not the
    dataset's nor the other teacher's; a store resumed after a lost shard holds the same rows); training reads the
    packed union, each row routed to its store (a row a store lacks would stop the run), both teachers serving about
    half the positions."""
    from transformers import AutoTokenizer

    teachers = [store("add", tmp_path, assets["teacher"]), store("sub", tmp_path, assets["teacher2"])]
    config = config_for(assets, tmp_path, teachers, mixture="route", route_column="teacher")
    config["sample_packing"] = True
    path = write_config(tmp_path / "cfg.yml", config)
    precompute = ["axolotl", "xkd", "precompute", str(path), "--top-k", "8", "--rows-per-shard", "16"]
    run_cli(precompute)
    # One store rewritten after a lost shard (--name) holds exactly the same rows.
    from datasets import load_from_disk

    before = load_from_disk(str(tmp_path / "sub" / "train" / "shard-00001")).to_dict()
    shutil.rmtree(tmp_path / "sub" / "train" / "shard-00001")
    run_cli([*precompute, "--name", "sub"])
    assert load_from_disk(str(tmp_path / "sub" / "train" / "shard-00001")).to_dict() == before

    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    data = [json.loads(line) for line in (assets["data"] / "train.jsonl").read_text().splitlines()]
    for name, model, other in (("add", assets["teacher"], assets["teacher2"]),
                               ("sub", assets["teacher2"], assets["teacher"])):
        manifest, rows = stored(tmp_path / name)
        assert manifest["sequences"] == "teacher" and manifest["teacher_name"] == name
        assert manifest["generation"]["generator"] == name and manifest["generation"]["routed"] is True
        prompts = [tokenizer.decode([t for t, label in zip(r["input_ids"], r["labels"]) if label == -100],
                                    skip_special_tokens=True) for r in rows]
        assert sorted(prompts) == sorted(r["prompt"] for r in data if r["teacher"] == name)  # its routed rows, once
        mine = responses(rows)
        assert mine == answers(model, rows)
        assert mine != answers(other, rows)
        gold = {r["prompt"]: r["response"] for r in data}
        assert sum(tokenizer.decode(a, skip_special_tokens=True) != gold[p] for a, p in zip(mine, prompts)) > 0

    proc = train(path)
    assert "X-KD teacher 'add': store" in proc.stdout + proc.stderr
    run = steps(Path(config["output_dir"]))
    assert len(run) == 4 and all(math.isfinite(e["loss"]) and e["xkd/distill"] > 0 for e in run)
    for entry in run:
        add, sub = entry["xkd/teacher/add/share"], entry["xkd/teacher/sub/share"]
        assert add + sub == pytest.approx(1.0, abs=1e-3) and 0.2 < add < 0.8, entry


def test_named_generator_answers_once_for_every_store_and_a_live_teacher(assets, tmp_path):
    """weighted with `generator: sub`, an in-process teacher: the first store's run loads it to answer every row, the
    second store (another tokenizer, aligned) records the same rows, and training reads them while `sub` scores them
    live."""
    teachers = [store("add", tmp_path, assets["teacher"]),
                store("sp", tmp_path, assets["sp_teacher"], cross_tokenizer=True, cross_tokenizer_top_k=8),
                {"name": "sub", "source": "model", "path": str(assets["teacher2"])}]
    config = config_for(assets, tmp_path, teachers, mixture="weighted", generator="sub")
    path = write_config(tmp_path / "cfg.yml", config)
    run_cli(["axolotl", "xkd", "precompute", str(path), "--top-k", "8"])

    manifest, rows = stored(tmp_path / "add")
    assert manifest["generation"]["generator"] == "sub" and manifest["generation"]["routed"] is False
    assert len(rows) == 64 and responses(rows) == answers(assets["teacher2"], rows)
    sp_manifest, sp_rows = stored(tmp_path / "sp")
    assert sp_rows == rows and sp_manifest["generation"] == manifest["generation"]
    assert sp_manifest["vocab_map"] is not None  # aligned to the student's positions

    train(path)
    run = steps(Path(config["output_dir"]))
    assert len(run) == 4 and all(math.isfinite(e["loss"]) for e in run)
    for entry in run:
        assert entry["xkd/teacher/add/share"] == 1.0 and entry["xkd/teacher/sub/share"] == 1.0, entry
        assert entry["xkd/teacher/sp/share"] > 0.9, entry
        total = sum(entry[f"xkd/teacher/{n}/weight"] for n in ("add", "sp", "sub"))
        assert total == pytest.approx(1.0, abs=1e-3), entry


@pytest.mark.parametrize("xkd, message", [
    ({"mixture": "weighted"}, ("xkd.sequences: teacher with xkd.mixture: weighted needs xkd.generator, the teacher "
     "whose model samples every response (one of ['add', 'sub'])")),
    ({"mixture": "confidence", "generator": "mul"}, "xkd.generator 'mul' is not one of xkd.teachers' names"),
    ({"mixture": "weighted", "generator": "sub"}, ("xkd.teachers[1] ('sub') samples the responses (xkd.generator) but "
     "is a teacher server")),
])
def test_configs_that_cannot_say_who_answers_are_refused_before_the_data(assets, tmp_path, xkd, message):
    teachers = [store("add", tmp_path, assets["teacher"]),
                {"name": "sub", "source": "server", "base_url": "http://127.0.0.1:9"}]
    config = config_for(assets, tmp_path, teachers, **xkd)
    proc = run_cli(["python", "-m", "axolotl.cli.train", str(write_config(tmp_path / "cfg.yml", config))],
                   check=False)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in logs, logs[-3000:]
    assert not (tmp_path / "prepared").exists()


def test_route_by_dataset_entry_generates_each_entrys_rows_with_its_teacher(assets, tmp_path):
    """Entries naming their teacher (`xkd_teacher:`, no route column): each store holds its entry's rows, answered by
    its own teacher; a third teacher that no entry names has an empty store, and training serves the other two."""
    from transformers import AutoTokenizer

    from tests.e2e.test_route_entries import entry_config

    config = entry_config(assets, tmp_path, ("add", "sub"))
    config["xkd"].update(teachers=[store("add", tmp_path, assets["teacher"]),
                                   store("sub", tmp_path, assets["teacher2"]),
                                   store("idle", tmp_path, assets["teacher"])],
                         sequences="teacher", generation=GENERATION)
    path = write_config(tmp_path / "cfg.yml", config)
    run_cli(["axolotl", "xkd", "precompute", str(path), "--top-k", "8"])
    assert json.loads((tmp_path / "idle" / "manifest.json").read_text())["splits"] == {"train": 0}
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    for name, op, model in (("add", "+", assets["teacher"]), ("sub", "-", assets["teacher2"])):
        manifest, rows = stored(tmp_path / name)
        assert manifest["generation"]["generator"] == name and len(rows) > 10
        assert all(op in tokenizer.decode([t for t, label in zip(r["input_ids"], r["labels"]) if label == -100])
                   for r in rows)
        assert responses(rows) == answers(model, rows)

    train(path)
    run = steps(Path(config["output_dir"]))
    assert len(run) == 3 and all(e["xkd/teacher/idle/share"] == 0 for e in run)
    assert all(e["xkd/teacher/add/share"] + e["xkd/teacher/sub/share"] == pytest.approx(1.0, abs=1e-3) for e in run)


def test_generated_rows_hold_an_eval_split_that_training_evaluates_on(assets, tmp_path):
    """confidence with `generator: add` (a store) and a live teacher, val_set_size > 0: the store holds the generator's
    answers in both splits, and training evaluates on the eval split with a finite loss."""
    teachers = [store("add", tmp_path, assets["teacher"]), {"name": "sub", "source": "model",
                                                            "path": str(assets["teacher2"])}]
    config = config_for(assets, tmp_path, teachers, mixture="confidence", generator="add")
    config.update(val_set_size=0.25, eval_strategy="steps", eval_steps=2)
    path = write_config(tmp_path / "cfg.yml", config)
    run_cli(["axolotl", "xkd", "precompute", str(path), "--top-k", "8"])

    from axolotl_xkd.store.format import Manifest
    from axolotl_xkd.store.read import load_split

    manifest = Manifest.read(tmp_path / "add")
    assert set(manifest.splits) == {"train", "eval"} and manifest.splits["eval"] == 16, manifest.splits
    held = load_split(tmp_path / "add", manifest, "eval").select_columns(["input_ids", "labels"]).to_list()
    assert responses(held) == answers(assets["teacher"], held)

    train(path)
    logs = log_history(Path(config["output_dir"]))
    evaluated = [e["eval_loss"] for e in logs if "eval_loss" in e]
    assert len(evaluated) >= 2 and all(math.isfinite(v) for v in evaluated), logs
