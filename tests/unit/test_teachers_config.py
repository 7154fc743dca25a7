"""`xkd.teachers` and `xkd.mixture` through Axolotl's own config validation (`load_cfg`, as `axolotl train` does):
what is accepted, and each refusal naming the key and what to do; and a teacher of another vocabulary refused before
any data is prepared, named by its place in the list."""

from __future__ import annotations

import pytest

from tests.support import base_config, merged, write_config


@pytest.fixture()
def load(tmp_path, untrained_assets):
    from axolotl.cli.config import load_cfg

    def _load(xkd: dict):
        config = merged(base_config(untrained_assets, tmp_path), {"xkd": xkd})
        if "teachers" in xkd and "teacher" not in xkd:
            config["xkd"].pop("teacher")
        return load_cfg(str(write_config(tmp_path / "cfg.yml", config)))

    return _load


@pytest.fixture()
def two(untrained_assets) -> list[dict]:
    return [{"name": "add", "source": "model", "path": str(untrained_assets["teacher"])},
            {"name": "sub", "source": "server", "base_url": "http://127.0.0.1:9", "weight": 2.0}]


def test_two_teachers_with_each_mixture_validate(load, two):
    for mixture, extra in (("route", {"route_column": "teacher", "default_teacher": "add"}), ("weighted", {}),
                           ("confidence", {"confidence_score": "neg_entropy", "confidence_temperature": 0.5})):
        cfg = load({"teachers": two, "mixture": mixture, **extra})
        assert [t["name"] for t in cfg.xkd["teachers"]] == ["add", "sub"] and cfg.xkd["mixture"] == mixture


@pytest.mark.parametrize("change, fragment", [
    ({"teachers": "SAME_NAMES", "mixture": "weighted"}, "the name 'add' is used by items [0, 1]"),
    ({"teachers": "ZERO_WEIGHT", "mixture": "weighted"}, "weight"),
    ({"teachers": "TWO", "teacher": "KEEP", "mixture": "weighted"}, "xkd.teacher and xkd.teachers are both set"),
    ({"teachers": "TWO"}, "xkd.mixture is required with xkd.teachers"),
    ({"teachers": "TWO", "mixture": "route"}, "xkd.mixture: route needs xkd.route_column"),
    ({"teachers": "TWO", "mixture": "route", "route_column": "t", "default_teacher": "mul"},
     "xkd.default_teacher 'mul' is not one of xkd.teachers' names ['add', 'sub']"),
    ({"teachers": "TWO", "mixture": "weighted", "route_column": "t"},
     "xkd.route_column is not read with xkd.mixture: weighted; remove it"),
    ({"mixture": "weighted"}, "xkd.mixture is read only with xkd.teachers"),
    ({"teachers": "TWO", "mixture": "weighted", "sequences": "teacher"},
     ("xkd.sequences: teacher with xkd.mixture: weighted needs xkd.generator, the teacher whose model samples every "
     "response (one of ['add', 'sub'])")),
    ({"teachers": "MISSPELT", "mixture": "weighted"}, "xkd.teachers[1].wieght (did you mean `weight`?)"),
])
def test_refusals_name_the_key(load, two, untrained_assets, change, fragment):
    teachers = {"TWO": two, "SAME_NAMES": [two[0], {**two[1], "name": "add"}],
                "ZERO_WEIGHT": [two[0], {**two[1], "weight": 0}],
                "MISSPELT": [two[0], {**{k: v for k, v in two[1].items() if k != "weight"}, "wieght": 2}]}
    xkd = {**change}
    if "teachers" in xkd:
        xkd["teachers"] = teachers[xkd["teachers"]]
    if xkd.get("teacher") == "KEEP":
        xkd["teacher"] = {"source": "model", "path": str(untrained_assets["teacher"])}
    with pytest.raises(Exception) as error:
        load(xkd)
    assert fragment in str(error.value)


def test_a_listed_teacher_of_another_vocabulary_is_refused_by_its_place(untrained_assets, tmp_path):
    """Without `cross_tokenizer`, each listed teacher's tokenizer must be the student's; the error names the item."""
    from transformers import AutoTokenizer

    from axolotl_xkd.args import XKDConfig
    from axolotl_xkd.tiny import build_bpe_tokenizer
    from axolotl_xkd.wiring import check_teacher_tokenizer

    other = build_bpe_tokenizer(["1+2=3", "4-1=3"], style="sentencepiece", vocab_size=40)
    other.save_pretrained(tmp_path / "other")
    teachers = [{"name": "a", "source": "model", "path": str(untrained_assets["teacher"])},
                {"name": "b", "source": "model", "path": str(tmp_path / "other")}]
    config = XKDConfig.model_validate({"teachers": teachers, "mixture": "weighted"})

    student = AutoTokenizer.from_pretrained(untrained_assets["tokenizer"])
    check_teacher_tokenizer(config.teachers[0], lambda: student, where="xkd.teachers[0]")
    with pytest.raises(ValueError, match=r"xkd.teachers\[1\].path="):
        check_teacher_tokenizer(config.teachers[1], lambda: student, where="xkd.teachers[1]")


def stores(assets) -> list[dict]:
    """Two stores whose models sample in the student's tokenizer, the second also of a teacher served elsewhere."""
    return [{"name": "add", "source": "precomputed", "path": "/tmp/add", "model_path": str(assets["teacher"])},
            {"name": "sub", "source": "precomputed", "path": "/tmp/sub", "model_path": str(assets["teacher"])}]


def test_teacher_generations_with_several_teachers_validate(load, two, untrained_assets):
    """route: each store's model samples its own rows (no generator) or the named one samples all; weighted and
    confidence: the named generator samples, a store holds the rows and a live teacher scores them."""
    routed = load({"teachers": stores(untrained_assets), "mixture": "route", "route_column": "teacher",
                   "sequences": "teacher"})
    assert routed.xkd["generator"] is None
    named = load({"teachers": stores(untrained_assets), "mixture": "route", "route_column": "teacher",
                  "sequences": "teacher", "generator": "sub"})
    assert named.xkd["generator"] == "sub"
    mixed = load({"teachers": [two[0], stores(untrained_assets)[1]], "mixture": "confidence", "sequences": "teacher",
                  "generator": "add"})
    assert mixed.xkd["generator"] == "add"


@pytest.mark.parametrize("change, fragment", [
    ({"mixture": "weighted"}, "xkd.sequences: teacher with xkd.mixture: weighted needs xkd.generator"),
    ({"mixture": "confidence", "generator": "mul"}, ("xkd.generator 'mul' is not one of xkd.teachers' names "
     "['add', 'sub']")),
    ({"mixture": "weighted", "generator": "sub", "SUB": {"source": "server", "base_url": "http://127.0.0.1:9"}},
     "xkd.teachers[1] ('sub') samples the responses (xkd.generator) but is a teacher server"),
    ({"mixture": "weighted", "generator": "sub", "SUB": {"model_path": None}},
     "xkd.teachers[1] ('sub') samples the responses (xkd.generator) but has no model_path"),
    ({"mixture": "route", "route_column": "t", "SUB": {"cross_tokenizer": True}},
     ("xkd.teachers[1] ('sub') samples its routed rows' responses (xkd.mixture: route without xkd.generator) but has "
     "another tokenizer")),
    ({"mixture": "route", "route_column": "t", "generator": "add", "SUB": {"source": "model", "path": "/m"}},
     ("xkd.sequences: teacher with xkd.mixture: route keeps each row in its teacher's store, but ['sub'] are not "
     "`source: precomputed`")),
    ({"mixture": "weighted", "generator": "add", "ADD": {"source": "model", "path": "/m"},
      "SUB": {"source": "model", "path": "/m"}}, "needs a `source: precomputed` teacher: its store"),
    ({"mixture": "weighted", "generator": "add", "sequences": "dataset"},
     "xkd.generator is read only with xkd.teachers and xkd.sequences: teacher"),
])
def test_teacher_generation_refusals_name_the_key(untrained_assets, change, fragment):
    """Each refusal of `sequences: teacher` with several teachers, from the `xkd:` block alone."""
    from axolotl_xkd.args import XKDConfig

    add, sub = stores(untrained_assets)
    for key, item in (("ADD", add), ("SUB", sub)):
        edit = change.get(key, {})
        item.update(edit)
        if edit.get("source") in ("model", "server"):
            for gone in ("path" if edit["source"] == "server" else None, "model_path"):
                item.pop(gone, None)
    block = {"teachers": [add, sub], "sequences": "teacher",
             **{k: v for k, v in change.items() if k not in ("ADD", "SUB")}}
    with pytest.raises(ValueError) as error:
        XKDConfig.model_validate(block)
    assert fragment in str(error.value)


def test_store_plans_answer_once_per_row(untrained_assets):
    """How precompute writes the stores of `sequences: teacher`: under route each store its own routed rows, answered
    by its own model (no generator) or the generator's; under a mixture the first store answers with the generator's
    model (an in-process item here) and the second scores the first's rows."""
    from axolotl_xkd.args import XKDConfig
    from axolotl_xkd.store.generated import store_plans

    add, sub = stores(untrained_assets)
    routed = store_plans(XKDConfig.model_validate({"teachers": [add, sub], "mixture": "route", "route_column": "t",
                                                    "sequences": "teacher"}))
    assert [(p.name, p.generator, p.routed.index, p.rows_from) for p in routed] == [("add", None, 0, None),
                                                                                     ("sub", None, 1, None)]
    assert routed[1].generated_by == {"generator": "sub", "routed": True}
    named = store_plans(XKDConfig.model_validate({"teachers": [add, sub], "mixture": "route", "route_column": "t",
                                                   "sequences": "teacher", "generator": "sub"}))
    assert named[0].generator.path == sub["model_path"] and named[1].generator is None
    live = {"name": "live", "source": "model", "path": str(untrained_assets["teacher"])}
    mixed = store_plans(XKDConfig.model_validate({"teachers": [live, sub, add], "mixture": "confidence",
                                                  "sequences": "teacher", "generator": "live"}))
    assert [(p.name, p.routed, p.rows_from) for p in mixed] == [("sub", None, None), ("add", None, "/tmp/sub")]
    assert mixed[0].generator.path == live["path"] and mixed[1].generator is None
    assert mixed[1].generated_by == {"generator": "live", "routed": False}
