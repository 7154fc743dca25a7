"""A route named per Axolotl `datasets:` entry (`xkd_teacher:`) through Axolotl's own config validation (`load_cfg`):
accepted without a route column, and each refusal naming the entry's key and what to do."""

from __future__ import annotations

import pytest

from tests.support import base_config, merged, write_config


@pytest.fixture()
def load(tmp_path, untrained_assets):
    from axolotl.cli.config import load_cfg

    def _load(teachers: list[str | None], **xkd):
        config = base_config(untrained_assets, tmp_path)
        entry = config["datasets"][0]
        config["datasets"] = [entry if t is None else {**entry, "xkd_teacher": t} for t in teachers]
        two = [{"name": "add", "source": "model", "path": str(untrained_assets["teacher"])},
               {"name": "sub", "source": "model", "path": str(untrained_assets["teacher"])}]
        config = merged(config, {"xkd": {"teachers": two, **xkd}})
        config["xkd"].pop("teacher")
        return load_cfg(str(write_config(tmp_path / "cfg.yml", config)))

    return _load


def test_entries_naming_their_teachers_need_no_route_column(load):
    cfg = load(["add", "sub"], mixture="route")
    assert cfg.xkd["mixture"] == "route" and cfg.xkd.get("route_column") is None
    # An entry naming none reads the column, or goes to the default teacher.
    assert load(["add", None], mixture="route", route_column="teacher").xkd["route_column"] == "teacher"
    assert load(["add", None], mixture="route", default_teacher="sub").xkd["default_teacher"] == "sub"


@pytest.mark.parametrize("teachers, xkd, fragment", [
    (["add", "mul"], {"mixture": "route"}, "datasets[1].xkd_teacher 'mul' is not one of xkd.teachers' names"),
    (["add", None], {"mixture": "route"},
     "xkd.mixture: route needs xkd.route_column, the dataset column that names each row's teacher (one of ['add', "
     "'sub']), or `xkd_teacher: <name>` in each `datasets:` entry (without one: datasets[1])"),
    (["add", "sub"], {"mixture": "weighted"},
     "datasets[0].xkd_teacher routes the entry's rows to a teacher, which only xkd.teachers with xkd.mixture: route "
     "reads"),
])
def test_refusals_name_the_entry(load, teachers, xkd, fragment):
    with pytest.raises(Exception) as error:
        load(teachers, **xkd)
    assert fragment in str(error.value)
