"""Bad `xkd:` blocks fail Axolotl's own config validation with an error that names the key."""

from __future__ import annotations

import pytest

from tests.support import base_config, merged, write_config


@pytest.fixture()
def load(tmp_path, untrained_assets):
    """Validate an `xkd:` override through axolotl.cli.config.load_cfg, as `axolotl train` does."""
    from axolotl.cli.config import load_cfg

    def _load(xkd_override: dict, **top_level):
        config = merged(base_config(untrained_assets, tmp_path), {"xkd": xkd_override, **top_level})
        if xkd_override.get("teacher") == "REPLACE":
            config["xkd"]["teacher"] = {"source": "model"}
        return load_cfg(str(write_config(tmp_path / "cfg.yml", config)))

    return _load


def test_valid_block_passes_with_defaults(load):
    cfg = load({"divergence": "jsd", "beta": 0.3})
    assert cfg.xkd["divergence"] == "jsd" and cfg.xkd["beta"] == 0.3
    assert cfg.xkd["td_weight"] == 0.1 and cfg.xkd["reward_kl_weight"] == 0.1 and cfg.xkd["q_form"] == "ava"


def test_coupled_preset_sets_the_coupled_form_and_keys_beside_it_win(load):
    from axolotl_xkd.options import PRESETS

    cfg = load({"preset": "coupled"})
    assert {key: cfg.xkd[key] for key in PRESETS["coupled"]} == PRESETS["coupled"]
    assert PRESETS["coupled"]["td_target"] == "observed" and PRESETS["coupled"]["reward_detach_backbone"] is False
    beside = load({"preset": "coupled", "td_weight": 0.05, "reward_detach_backbone": True})
    assert beside.xkd["td_weight"] == 0.05 and beside.xkd["reward_detach_backbone"] is True
    assert beside.xkd["td_target"] == "observed" and beside.xkd["preset"] == "coupled"


@pytest.mark.parametrize(
    "override,fragment",
    [
        ({"td_weight": -1.0}, "xkd.td_weight"),
        ({"reward_kl_weight": -0.5}, "xkd.reward_kl_weight"),
        ({"alpha_kd": -1}, "xkd.alpha_kd"),
        ({"beta": 1.5}, "xkd.beta"),
        ({"beta": -0.1}, "xkd.beta"),
        ({"divergence": "kl"}, "xkd.divergence"),
        ({"q_form": "values"}, "xkd.q_form"),
        ({"temperature": 0}, "xkd.temperature"),
        ({"tempurature": 2.0}, "xkd.tempurature"),
        ({"teacher": "REPLACE"}, "xkd.teacher.model.path"),
        ({"teacher": {"source": "hub", "path": "x"}}, "xkd.teacher"),
        ({"teacher": {"source": "server", "base_url": "http://:8000", "path": None}}, "xkd.teacher.base_url='http:"),
        ({"log_std_min": 3.0, "log_std_max": 1.0}, "xkd.log_std_min"),
        ({"alpha_kd": 0.0, "reward_kl_weight": 0.0, "td_weight": 0.0}, "all 0"),
        ({"sequences": "teacher"}, "xkd.sequences: teacher"),
        ({"sequences": "on_policy", "teacher": {"source": "precomputed", "path": "x"}}, "xkd.sequences: on_policy"),
        ({"sequences": "student"}, "xkd.sequences"),
        ({"on_policy_fraction": 1.5}, "xkd.on_policy_fraction"),
        ({"generation": {"temperature": -1}}, "xkd.generation.temperature"),
        ({"generation": {"top_p": 0}}, "xkd.generation.top_p"),
        ({"generation": {"max_tokens": 8}}, "xkd.generation.max_tokens"),
        ({"preset": "paper"}, "xkd.preset"),
    ],
)
def test_bad_values_name_the_key(load, override, fragment):
    with pytest.raises(Exception) as info:
        load(override)
    assert fragment in str(info.value), str(info.value)


def test_missing_teacher_when_divergence_needs_it(load, untrained_assets, tmp_path):
    from axolotl.cli.config import load_cfg

    config = base_config(untrained_assets, tmp_path)
    config["xkd"] = {"divergence": "reverse_kl"}
    with pytest.raises(Exception, match="xkd.teacher is missing"):
        load_cfg(str(write_config(tmp_path / "cfg.yml", config)))


def test_sequence_divergence_needs_no_teacher(untrained_assets, tmp_path):
    from axolotl.cli.config import load_cfg

    config = base_config(untrained_assets, tmp_path)
    config["xkd"] = {"divergence": "sequence", "td_target": "observed"}
    assert load_cfg(str(write_config(tmp_path / "cfg.yml", config))).xkd["divergence"] == "sequence"


def test_default_reward_target_names_what_to_do_without_a_teacher(untrained_assets, tmp_path):
    """The default td_target reads the teacher: a config without one is told the two ways out."""
    from axolotl.cli.config import load_cfg

    config = base_config(untrained_assets, tmp_path)
    config["xkd"] = {"divergence": "sequence"}
    with pytest.raises(Exception, match="td_target 'teacher_logprob'.*set `td_target: observed`"):
        load_cfg(str(write_config(tmp_path / "cfg.yml", config)))


def test_rl_is_refused(load):
    with pytest.raises(Exception, match="rl"):
        load({}, rl="dpo")


@pytest.mark.parametrize(
    "override,fragment",
    [
        ({"divergance": "jsd"}, "unknown key xkd.divergance (did you mean `divergence`?)"),
        ({"teacher": {"source": "model", "path": "x", "tokenzier_path": "y"}},
         "xkd.teacher.tokenzier_path (did you mean `tokenizer_path`?)"),
        ({"teacher": {"source": "server", "base_url": "http://h:1", "timeout": 5}},
         "xkd.teacher.timeout (did you mean `timeout_s`?)"),
        ({"generation": {"temprature": 0.5}}, "xkd.generation.temprature (did you mean `temperature`?)"),
        ({"zzz": 1}, "xkd.zzz (the keys of `xkd`: preset, teacher, teachers, mixture,"),
    ],
)
def test_unknown_keys_are_named_with_the_closest_known_key(load, override, fragment):
    """Issue 35: a misspelt key was refused by extra="forbid" with no hint; Axolotl's own validation error now
    names it and the schema's closest key, at every level of the block."""
    with pytest.raises(Exception) as info:
        load(override)
    assert fragment in str(info.value) and "correct the spelling" in str(info.value), str(info.value)


def test_every_unknown_key_is_named_at_once(load):
    with pytest.raises(Exception) as info:
        load({"divergance": "jsd", "generation": {"top_q": 0.5}})
    assert "unknown keys xkd.divergance (did you mean `divergence`?), xkd.generation.top_q (did you mean `top_p`?)" \
        in str(info.value), str(info.value)
